"""The group sampler: B prompts × G completions from the live model on shared paged KV.

One ``generate`` call: every prompt is prefilled once (prompts batched together), its blocks are
forked into G sequences (the partial last block included, copied on first write), and all live
sequences decode together, one token per step. Finished sequences free their blocks at once and
waiting prompts are admitted as blocks free up; when blocks run out a sequence is preempted and
later recomputed. The block manager is fresh for each call: its prefix cache holds K/V of the
weights as they were during this call, and the policy changes between GRPO steps.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import time
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from grpo_fast.intmath import ceil_div
from grpo_fast.models.causal_lm import keep_4bit_layout
from grpo_fast.sampler.block_manager import BlockManager
from grpo_fast.sampler.kv_budget import num_blocks_for_budget
from grpo_fast.sampler.model_runner import ModelRunner
from grpo_fast.sampler.outputs import Completion, GroupOutput, SamplerStats
from grpo_fast.sampler.sampling_op import sample
from grpo_fast.sampler.sampling_params import SamplingParams
from grpo_fast.sampler.scheduler import Scheduler
from grpo_fast.sampler.sequence import Group, Sequence, prefill_seq_id, prefill_tokens
from grpo_fast.sampler.turns import TurnEnd, call_handler, read_answer, trajectory_end
from grpo_fast.thread_governor import ThreadGovernor, governor_for

_SEED_MASK = (1 << 63) - 1


class Sampler:
    """``Sampler(model, tokenizer, block_size=16, kv_budget="512MiB")``.

    model: a Llama-family HF causal LM, optionally 4-bit (bitsandbytes) and/or wrapped by peft;
    its modules are used as they are (no merge, no copy). tokenizer: gives EOS and decodes text
    for stop strings (may be None when neither is needed). kv_budget: bytes (int), a string
    ("2GiB", "65536 tokens") or None for the default (see kv_budget.py). cuda_graphs: replay
    recorded decode steps on CUDA (see decode_graphs.py; off by default). cascade: attend a
    group's shared prompt once for all its sequences where that pays (the device's measured
    threshold, see model_runner.default_cascade_min_prefix; on by default, False: never).
    threads (CPU): True (default) runs the steps on as many torch threads as the cores other
    processes leave free, re-measured every quarter second (grpo_fast.thread_governor: beside one
    busy process a bf16 model's steps took ~40x their idle time on 2 threads); False: torch's
    count as it is; a ThreadGovernor: that one (a trainer shares its own).
    """

    def __init__(self, model, tokenizer=None, *, block_size: int = 16, kv_budget=None,
                 max_prefill_tokens: int = 4096, cuda_graphs: bool = False, cascade: bool = True,
                 threads: bool | ThreadGovernor = True):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an int >= 1, got {max_prefill_tokens!r}")
        keep_4bit_layout(model)  # NF4 weights in the layout (and numerics) the trainer reads
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        per_block = ModelRunner.bytes_per_block(model, block_size)
        device = next(model.parameters()).device
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}")
        if not isinstance(cascade, bool):
            raise ValueError(f"cascade must be a bool, got {cascade!r}")
        self.threads = governor_for(threads, device)
        num_blocks = num_blocks_for_budget(kv_budget, bytes_per_block=per_block, block_size=block_size, device=device)
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, cuda_graphs=cuda_graphs,
                                  cascade=cascade)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.stats = SamplerStats()
        self._turn_handler = None  # set for one generate call (multi-turn)
        self._paused: dict = {}

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def release_kv_cache(self) -> None:
        """Free the KV cache memory until the next generate call (which allocates it again).
        A trainer that alternates sampling and training calls this after each sampling phase."""
        self.runner.release()

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, *,
                 turn_handler=None) -> list[GroupOutput]:
        """G = params.n completions for each prompt, in prompt order. Prompts are lists of token
        ids (Python or numpy ints), 1-D tensors / arrays, or one 2-D tensor of equal-length rows.

        turn_handler (multi-turn, see turns.py): called with a TurnEnd whenever a sequence stops on
        EOS / a stop string or token; it returns the environment's tokens to append (or a Future
        of them), or None to finish. Appended tokens are prefilled once against the sequence's
        own KV; params.max_tokens bounds the whole trajectory (model + environment tokens): an
        answer that would leave no room for a model token ends the trajectory with "length"."""
        prompt_token_ids = _token_lists(prompt_token_ids)
        self._validate(prompt_token_ids, params)
        if turn_handler is not None and not callable(turn_handler):
            raise ValueError(f"turn_handler must be callable, got {type(turn_handler).__name__}")
        self._turn_handler = turn_handler
        was_training = [m.training for m in self.model.modules()]
        self.model.eval()  # no LoRA / attention dropout while sampling
        try:
            with torch.inference_mode(), self.runner.generate_call():
                return self._generate(prompt_token_ids, params)
        finally:
            self._turn_handler = None
            self._paused = {}
            for m, flag in zip(self.model.modules(), was_training):
                m.training = flag

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GroupOutput]:
        t0 = time.perf_counter()
        stats = self.stats = SamplerStats(
            num_blocks=self.num_blocks, block_size=self.block_size, kv_bytes=self.runner.kv_bytes
        )
        bm = BlockManager(self.num_blocks, self.block_size)
        sched = Scheduler(bm, self.max_prefill_tokens)
        base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        ids = itertools.count()
        groups = []
        for gi, prompt in enumerate(prompts):
            group = Group(gi, list(prompt), prefill_id=next(ids))
            group.children = [
                Sequence(next(ids), group, c, seed=_mix_seed(base_seed, params.first_group + gi, c),
                         token_ids=list(prompt))
                for c in range(params.n)
            ]
            groups.append(group)
            sched.add(group)

        self._paused = {}  # Sequence -> (Future of the environment's answer, the turn's finish reason)
        with self.threads.phase() if self.threads is not None else contextlib.nullcontext():
            self._run(bm, sched, params, stats)
        stats.preemptions = sched.num_preemptions
        stats.wall_seconds = time.perf_counter() - t0
        outputs = []
        multi_turn = self._turn_handler is not None
        for group in groups:
            completions = [
                Completion(s.completion_token_ids, list(s.logprobs), s.finish_reason,
                           list(s.model_mask) if multi_turn else None, s.num_turns)
                for s in group.children
            ]
            outputs.append(GroupOutput(group.prompt_token_ids, completions))
        stats.generated_tokens = sum(len(c.token_ids) for o in outputs for c in o.completions)
        return outputs

    def _run(self, bm, sched: Scheduler, params, stats) -> None:
        """Prefill, extend and decode steps until every sequence has finished; the thread governor
        (if any) follows the CPU load between steps."""
        tick = self.threads.tick if self.threads is not None else (lambda: None)
        while not sched.done or self._paused:
            tick()
            answered = [seq for seq, (future, _) in self._paused.items() if future.done()]
            if answered:
                t = time.perf_counter()
                self._extend_step(bm, sched, answered, params, stats)
                stats.extend_seconds += time.perf_counter() - t
                continue
            admitted = sched.schedule_prefill()
            if admitted:
                t = time.perf_counter()
                self._prefill_step(bm, sched, admitted, params, stats)
                stats.prefill_seconds += time.perf_counter() - t
                continue
            if not sched.running:
                if self._paused:  # every live sequence waits on its environment
                    t = time.perf_counter()
                    wait([future for future, _ in self._paused.values()], return_when=FIRST_COMPLETED)
                    stats.wait_seconds += time.perf_counter() - t
                    continue
                raise RuntimeError("sampler made no progress: the KV pool cannot hold the next prompt")  # never spin
            seqs, copies = sched.schedule_decode()
            if not seqs:  # everything was preempted: re-admit first
                continue
            self._record_blocks(bm, seqs, stats)
            t = time.perf_counter()
            self.runner.copy_blocks(copies)
            logits = self.runner.decode(bm.pool, [s.seq_id for s in seqs], [s.last_token for s in seqs],
                                        [s.group.group_idx for s in seqs])  # [S, V]
            self._sample_and_advance(logits, seqs, sched, params)
            stats.decode_seconds += time.perf_counter() - t
            stats.decode_tokens += len(seqs)
            stats.steps += 1

    def _prefill_step(self, bm, sched: Scheduler, admitted, params, stats) -> None:
        items = []
        for item, num_cached in admitted:
            tokens = prefill_tokens(item)
            items.append((prefill_seq_id(item), tokens, num_cached))
            stats.prefill_tokens += len(tokens) - min(num_cached, len(tokens) - 1)
        logits = self.runner.prefill(bm.pool, items)  # [B, V]
        rows, seqs = [], []
        for b, (item, _) in enumerate(admitted):
            if isinstance(item, Group):
                children = item.children
                bm.fork(item)
            else:
                children = [item]
            rows.extend([b] * len(children))
            seqs.extend(children)
        stats.peak_blocks_used = max(stats.peak_blocks_used, bm.num_used_blocks)
        sched.start_running(seqs)
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        self._sample_and_advance(logits.index_select(0, index), seqs, sched, params)

    def _sample_and_advance(self, logits: torch.Tensor, seqs: list[Sequence], sched: Scheduler,
                            params: SamplingParams) -> None:
        """Draw one token per sequence (logits [S, V] fp32), append it, retire finished ones."""
        dev = logits.device
        num = len(seqs)
        temperature = torch.full((num,), float(params.temperature), dtype=torch.float32, device=dev)
        top_k = torch.full((num,), params.top_k, dtype=torch.int32, device=dev)
        top_p = torch.full((num,), float(params.top_p), dtype=torch.float32, device=dev)
        min_p = torch.full((num,), float(params.min_p), dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev)
        steps = torch.tensor([s.num_completion_tokens for s in seqs], dtype=torch.int64, device=dev)
        tokens, logprobs = sample(logits.contiguous(), temperature, top_k, top_p, min_p, seeds, steps)
        for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            seq.model_mask.append(1)
            reason = self._finish_reason(seq, token, params)
            if reason is None:
                continue
            if self._turn_handler is not None and reason != "length":
                self._end_turn(seq, reason, sched, params)
            else:
                sched.finish(seq, reason)

    def _end_turn(self, seq: Sequence, reason: str, sched: Scheduler, params: SamplingParams) -> None:
        """A model turn ended: ask the handler, and wait (holding the blocks) for its answer."""
        sched.pause(seq)
        self.stats.handler_calls += 1
        completion = seq.completion_token_ids
        turn = TurnEnd(seq.group.group_idx, seq.child_idx, completion, completion[seq.turn_start:], reason,
                       seq.num_turns, params.max_tokens - len(completion))
        self._paused[seq] = (call_handler(self._turn_handler, turn), reason)

    def _extend_step(self, bm: BlockManager, sched: Scheduler, answered: list[Sequence], params: SamplingParams,
                     stats: SamplerStats) -> None:
        """Append each answered sequence's environment tokens and prefill only them (plus the
        pending last token) against its own KV, then sample its next token. A sequence whose new
        tokens need more blocks than are free is preempted instead: it is recomputed later from
        all of its tokens, like any preempted sequence."""
        items, seqs, copies = [], [], []
        for seq in answered:
            future, reason = self._paused.pop(seq)
            where = f"prompt {seq.group.group_idx}, completion {seq.child_idx}"
            tokens = read_answer(future, self.runner.family.config.vocab_size, where)
            end = trajectory_end(tokens, reason, seq.num_completion_tokens, params.max_tokens)
            if end is not None:
                sched.finish(seq, end)
                continue
            cached = bm.pool.num_tokens(seq.seq_id)  # = len(token_ids) - 1: the last token is pending
            seq.token_ids.extend(tokens)
            seq.logprobs.extend([0.0] * len(tokens))
            seq.model_mask.extend([0] * len(tokens))
            seq.turn_start = seq.num_completion_tokens
            seq.num_turns += 1
            stats.environment_tokens += len(tokens)
            new = len(seq.token_ids) - cached
            # +1: the partial last block may be shared with the group (copy-on-write)
            if bm.blocks_for(cached + new) - bm.blocks_for(cached) + 1 > bm.num_free_blocks:
                sched.preempt(seq)
                continue
            for _ in range(new):
                copies.extend(bm.append(seq))
            items.append((seq.seq_id, seq.token_ids, cached))
            seqs.append(seq)
            stats.prefill_tokens += len(tokens)  # the pending token is a decode token, counted there
            stats.decode_tokens += 1
        if not seqs:
            return
        self.runner.copy_blocks(copies)
        logits = self.runner.prefill(bm.pool, items)  # [S, V]
        stats.peak_blocks_used = max(stats.peak_blocks_used, bm.num_used_blocks)
        sched.start_running(seqs)
        self._sample_and_advance(logits, seqs, sched, params)

    def _finish_reason(self, seq: Sequence, token: int, params: SamplingParams) -> str | None:
        if not params.ignore_eos and token in self.eos_token_ids:
            return "eos"
        if token in params.stop_token_ids:
            return "stop"
        if params.stop and self._hits_stop_string(seq.completion_token_ids[seq.turn_start:], params.stop):
            return "stop"
        if seq.num_completion_tokens >= params.max_tokens:
            return "length"
        if params.max_turn_tokens is not None and seq.num_completion_tokens - seq.turn_start >= params.max_turn_tokens:
            return "turn_length" if self._turn_handler is not None else "length"
        return None

    def _hits_stop_string(self, completion: list[int], stop: tuple[str, ...]) -> bool:
        # A stop string is at most len(s) tokens long (every token decodes to >= 1 char, bar partial
        # UTF-8 bytes, hence the margin); only a string ending in the newest token can be new.
        tail = completion[-(max(len(s) for s in stop) + 4):]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in stop)

    def _record_blocks(self, bm: BlockManager, seqs: list[Sequence], stats: SamplerStats) -> None:
        stats.peak_blocks_used = max(stats.peak_blocks_used, bm.num_used_blocks)
        stats.peak_blocks_saved_by_sharing = max(stats.peak_blocks_saved_by_sharing, bm.blocks_saved_by_sharing(seqs))

    def _validate(self, prompts, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompt_token_ids must be a non-empty list of token-id lists")
        if params.stop and self.tokenizer is None:
            raise ValueError("params.stop needs the Sampler to have a tokenizer")
        vocab = self.runner.family.config.vocab_size
        window = self.runner.family.shape.sliding_window
        capacity = self.num_blocks * self.block_size
        for i, prompt in enumerate(prompts):
            if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt_token_ids[{i}] must be a non-empty list of ints in [0, {vocab})")
            total = len(prompt) + params.max_tokens
            if ceil_div(total, self.block_size) > self.num_blocks:
                raise ValueError(
                    f"kv_budget: prompt_token_ids[{i}] ({len(prompt)} tokens) + max_tokens "
                    f"({params.max_tokens}) needs {total} tokens of KV, the pool holds {capacity}"
                )
            if window is not None and total > window:
                raise ValueError(
                    f"max_tokens: prompt_token_ids[{i}] + max_tokens = {total} tokens exceeds the model's "
                    f"sliding window ({window}); the paged kernels attend over the full context"
                )


def _token_lists(prompts) -> list[list[int]]:
    """Prompts as lists of Python ints; ValueError naming the prompt that is not token ids."""
    if hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple)):  # a tensor / array
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, prompt in enumerate(prompts):
        if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt_token_ids[{i}] must be a list of token ids, got {type(prompt).__name__} "
                             f"(tokenize text first)")
        try:
            out.append([operator.index(t) for t in prompt])
        except TypeError:
            bad = next(t for t in prompt if not hasattr(t, "__index__"))
            raise ValueError(f"prompt_token_ids[{i}] holds {bad!r} ({type(bad).__name__}), not an integer "
                             f"token id") from None
    return out


def _mix_seed(base: int, group_idx: int, child_idx: int) -> int:
    """Distinct, reproducible per-sequence seed (splitmix64-style mixing of the indices)."""
    x = (base * 0x9E3779B97F4A7C15 + group_idx * 0xBF58476D1CE4E5B9 + child_idx * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return (x ^ (x >> 32)) & _SEED_MASK


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Tokens that end a completion: the generation config's EOS (else the model config's, as HF
    `generate` reads them) plus the tokenizer's."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return frozenset(int(i) for i in ids)
