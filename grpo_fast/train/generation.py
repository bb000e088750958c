"""The one place the trainer meets a generation engine.

`Generator.generate(prompt_ids, n=..., ...) -> list[GroupOutput]` runs our paged group sampler
(`grpo_fast.sampler.Sampler`) when it supports the model, and HF `generate` otherwise (or when
asked with backend="hf"). Both return the same structure: per prompt `.completions`, G of them,
each with `.token_ids` (EOS / stop token included), `.logprobs` (log softmax(logits / T) of each
sampled token, before top-k/top-p filtering) and `.finish_reason` ("eos" | "stop" | "length").
"""

from __future__ import annotations

import contextlib
import logging

import torch

from grpo_fast.errors import ConfigError
from grpo_fast.models.causal_lm import unwrap_causal_lm
from grpo_fast.sampler import Completion, GroupOutput, Sampler, SamplingParams
from grpo_fast.sampler.sampler import eos_token_ids
from grpo_fast.thread_governor import ThreadGovernor, governor_for
from grpo_fast.train.sharding import gathered

log = logging.getLogger(__name__)


class Generator:
    def __init__(self, model, tokenizer, *, backend: str = "auto", kv_budget=None, release_kv: bool = True,
                 threads: bool | ThreadGovernor = True):
        """release_kv: free the sampler's KV cache after each call (a trainer's sampling and
        training phases alternate, so the training pass gets that memory). threads: the CPU
        thread count follows the machine's load (True; a ThreadGovernor: that one, which a
        trainer shares with its training passes) or stays torch's (False); see Sampler."""
        self.model = model
        self.threads = governor_for(threads, next(model.parameters()).device)
        self.release_kv = release_kv
        self.tokenizer = tokenizer
        self.backend = "hf"
        self.sampler = None
        self.last_stats: dict = {}
        self.requested = backend
        self._notices: list[str] = []
        if backend in ("auto", "sampler"):
            try:
                self.sampler = Sampler(model, tokenizer, kv_budget=kv_budget, threads=self.threads or False)
                self.backend = "sampler"
            except ConfigError:
                raise  # a bad sampling.kv_budget is the user's to fix, not a reason to go slow
            except Exception as exc:  # unsupported architecture, or the sampler is unavailable
                if backend == "sampler":
                    raise ConfigError(f"sampling.backend: the paged sampler refused this model: {exc}") from exc
                self._notice(f"sampling: the paged sampler refused this model ({exc}); using HF generate, "
                             f"which is slower (sampling.backend=hf silences this)")

    def _notice(self, message: str) -> None:
        log.warning(message)
        self._notices.append(message)

    def take_notices(self) -> list[str]:
        """What the user should hear about the generation path since the last call (the trainer
        prints it): a fallback to the slower HF generate, and why."""
        out, self._notices = self._notices, []
        return out

    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, stop: list[str] | None = None,
                 seed: int | None = None, turn_handler=None, max_turn_tokens: int | None = None,
                 first_group: int = 0) -> list[GroupOutput]:
        """n completions per prompt; temperature 0 = greedy. A sharded model (train.fsdp) is
        gathered whole for the call (train/sharding.py). turn_handler: multi-turn (see
        grpo_fast.sampler.turns): the sampler appends the environment's tokens to live sequences;
        HF generate re-runs each conversation every turn (hf_generate_turns). first_group: these
        prompts' offset in the whole batch (data parallel): the sampler then draws exactly what
        one process would for them; HF generate (one RNG stream per call) only reseeds by it."""
        with gathered(self.model):
            return self._generate(prompt_ids, n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                                  top_k=top_k, min_p=min_p, stop=stop, seed=seed, turn_handler=turn_handler,
                                  max_turn_tokens=max_turn_tokens, first_group=first_group)

    def _generate(self, prompt_ids, *, n, temperature, max_tokens, top_p, top_k, min_p, stop, seed, turn_handler,
                  max_turn_tokens, first_group) -> list[GroupOutput]:
        if self.sampler is not None:
            params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                    max_tokens=max_tokens, stop=tuple(stop or ()), seed=seed,
                                    max_turn_tokens=max_turn_tokens, first_group=first_group)
            try:
                out = self.sampler.generate(prompt_ids, params, turn_handler=turn_handler)
            except Exception as exc:
                if self.requested == "sampler" or turn_handler is not None:
                    raise  # multi-turn: the handler's trajectories are half-run; a rerun would repeat their tools
                # backend="auto": a sampler failure must not cost the user the run; say so once
                # and continue on HF generate (same outputs contract, slower).
                self._notice(f"sampling: the paged sampler failed ({type(exc).__name__}: {exc}); "
                             f"continuing on HF generate, which is slower")
                self.sampler, self.backend = None, "hf"
            else:
                self.last_stats = self.sampler.stats.as_dict()
                return out
            finally:
                if self.release_kv and self.sampler is not None:
                    self.sampler.release_kv_cache()
        if seed is not None and first_group:
            seed = (seed + 104_729 * first_group) % (2**31 - 1)  # HF: one stream per call, another per share
        with self.threads.phase() if self.threads is not None else contextlib.nullcontext():  # HF's GEMMs too
            return self._hf_generate(prompt_ids, n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                                     top_k=top_k, min_p=min_p, stop=stop, seed=seed, turn_handler=turn_handler,
                                     max_turn_tokens=max_turn_tokens)

    def _hf_generate(self, prompt_ids, *, n, temperature, max_tokens, top_p, top_k, min_p, stop, seed, turn_handler,
                     max_turn_tokens) -> list[GroupOutput]:
        if turn_handler is not None:
            return hf_generate_turns(self.model, self.tokenizer, prompt_ids, n=n, temperature=temperature,
                                     max_tokens=max_tokens, top_p=top_p, top_k=top_k, min_p=min_p, stop=stop,
                                     seed=seed, turn_handler=turn_handler, max_turn_tokens=max_turn_tokens)
        return hf_generate(self.model, self.tokenizer, prompt_ids, n=n, temperature=temperature,
                           max_tokens=max_tokens, top_p=top_p, top_k=top_k, min_p=min_p, stop=stop, seed=seed)


def pinned_generation_config(model, tokenizer, *, temperature: float, max_tokens: int, top_p: float = 1.0,
                             top_k: int = 0, min_p: float = 0.0, pad: int):
    """A GenerationConfig that samples exactly softmax(logits / T), filtered by top_k / top_p /
    min_p as asked and by nothing else: every distribution-changing option of transformers'
    `generate` is set here, because a checkpoint's generation_config.json (repetition_penalty,
    top_k, min_p, suppress_tokens, ...) would otherwise fill the ones we leave unset, and the
    trainer would then score completions drawn from another distribution."""
    from transformers import GenerationConfig

    greedy = temperature == 0
    return GenerationConfig(
        max_new_tokens=max_tokens, min_new_tokens=None, min_length=0, do_sample=not greedy, num_beams=1,
        # greedy: argmax of the raw logits; the samplers' knobs stay unset (no "set but unused" warnings)
        temperature=None if greedy else temperature, top_k=None if greedy else int(top_k or 0),
        top_p=None if greedy else float(top_p), min_p=None if greedy or not min_p else float(min_p), typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
        exponential_decay_length_penalty=None, guidance_scale=None, renormalize_logits=False,
        remove_invalid_values=False, eos_token_id=sorted(eos_token_ids(model, tokenizer)), pad_token_id=pad,
        return_dict_in_generate=True, output_logits=True)


@contextlib.contextmanager
def _generation_config(model, config):
    """The model generates with `config` and nothing of its own generation_config (transformers
    fills every option left None from it, even when a config is passed to generate)."""
    lm = unwrap_causal_lm(model)
    saved = lm.generation_config
    lm.generation_config = config
    try:
        yield
    finally:
        lm.generation_config = saved


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, stop: list[str] | None = None,
                seed: int | None = None) -> list[GroupOutput]:
    """HF `generate` fallback with the Sampler's output contract. Prompts are left-padded and
    each repeated n times; the logged log-prob is log softmax(raw logits / T) (plain log softmax
    when greedy). Every sampling option is pinned (`pinned_generation_config`): the checkpoint's
    generation_config changes nothing."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    rows = [p for p in prompt_ids for _ in range(n)]  # n copies each (greedy refuses num_return_sequences)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    greedy = temperature == 0
    config = pinned_generation_config(model, tokenizer, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                                      top_k=top_k, min_p=min_p, pad=pad)
    kwargs = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _generation_config(model, config):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config,
                                 **kwargs)
    finally:
        model.train(was_training)
    new = out.sequences[:, width:].cpu()  # [P*n, C]
    logits = torch.stack(out.logits, dim=1).float().cpu()  # [P*n, C, V]
    scale = 1.0 if greedy else temperature
    logp = torch.log_softmax(logits / scale, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [P*n, C]
    eos = eos_token_ids(model, tokenizer)  # the same stop rule as the paged sampler
    groups = [GroupOutput(list(p), []) for p in prompt_ids]
    for row in range(new.shape[0]):
        toks, lps, reason = [], [], "length"
        for t in range(new.shape[1]):
            tok = int(new[row, t])
            toks.append(tok)
            lps.append(float(logp[row, t]))
            if tok in eos:
                reason = "eos"
                break
            if stop and any(s in tokenizer.decode(toks) for s in stop):
                reason = "stop"
                break
        groups[row // n].completions.append(Completion(toks, lps, reason))
    return groups


def hf_generate_turns(model, tokenizer, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                      turn_handler, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                      stop: list[str] | None = None, seed: int | None = None,
                      max_turn_tokens: int | None = None) -> list[GroupOutput]:
    """Multi-turn on HF `generate`, the way engines without a live KV cache do it: every turn,
    each unfinished conversation (prompt + all turns so far) is run again from its first token.
    Same contract as the Sampler's multi-turn generate (TurnEnd to the handler, model_mask,
    max_tokens bounding the whole trajectory, "turn_length" turns); the handler's futures are
    awaited turn by turn. The fallback for models the sampler refuses, and the benchmark's peer."""
    from grpo_fast.sampler.turns import TurnEnd, call_handler, read_answer, trajectory_end

    vocab = unwrap_causal_lm(model).config.vocab_size
    rows = [{"group": g, "child": c, "ids": [], "mask": [], "lps": [], "turn_start": 0, "turns": 1, "reason": None}
            for g in range(len(prompt_ids)) for c in range(n)]
    live = list(rows)
    turn_index = 0
    while live:
        room = max(max_tokens - len(r["ids"]) for r in live)
        step_tokens = min(room, max_turn_tokens) if max_turn_tokens is not None else room
        seqs = [list(prompt_ids[r["group"]]) + r["ids"] for r in live]
        outs = hf_generate(model, tokenizer, seqs, n=1, temperature=temperature, max_tokens=step_tokens, top_p=top_p,
                           top_k=top_k, min_p=min_p, stop=stop,
                           seed=None if seed is None else seed + 7919 * turn_index)
        turn_index += 1
        waiting = []
        for r, out in zip(live, outs):
            comp = out.completions[0]
            keep = min(len(comp.token_ids), max_tokens - len(r["ids"]))  # a row's own budget
            reason = comp.finish_reason if keep == len(comp.token_ids) else "length"
            r["ids"] += comp.token_ids[:keep]
            r["lps"] += comp.logprobs[:keep]
            r["mask"] += [1] * keep
            if reason == "length" and len(r["ids"]) < max_tokens:
                reason = "turn_length"  # the turn's cap, not the trajectory's
            if reason == "length":
                r["reason"] = "length"
                continue
            turn = TurnEnd(r["group"], r["child"], list(r["ids"]), r["ids"][r["turn_start"]:], reason, r["turns"],
                           max_tokens - len(r["ids"]))
            waiting.append((r, reason, call_handler(turn_handler, turn)))
        live = []
        for r, reason, future in waiting:
            where = f"prompt {r['group']}, completion {r['child']}"
            tokens = read_answer(future, vocab, where)
            end = trajectory_end(tokens, reason, len(r["ids"]), max_tokens)
            if end is not None:
                r["reason"] = end
                continue
            r["ids"] += tokens
            r["lps"] += [0.0] * len(tokens)
            r["mask"] += [0] * len(tokens)
            r["turn_start"] = len(r["ids"])
            r["turns"] += 1
            live.append(r)
    groups = [GroupOutput(list(p), []) for p in prompt_ids]
    for r in rows:
        groups[r["group"]].completions.append(Completion(r["ids"], r["lps"], r["reason"], r["mask"], r["turns"]))
    return groups
