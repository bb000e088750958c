"""The training forward: hidden states that predict each completion token, with each group's
prompt run once.

A group's G rows share their prompt. Rather than N · (P + C) tokens (every row in full, padded),
the prompt runs once per group and the completions over it, with no padding: packed into one
sequence with a block mask (SDPA / eager attention), or with the prompt's K/V cached and repeated
(flash-attention, which takes no custom mask). `completion_hidden` picks the layout; the plain
pass is the oracle the tests hold both to.

    batch.input_ids  [N, P + C]  ->  hidden [N, C, H]  (position P - 1 + t predicts token t)
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from grpo_fast.models.llama_family import active_sliding_window
from grpo_fast.train import layout_cost
from grpo_fast.train.cpu_attention import native_cpu_attention
from grpo_fast.train.fp32_attention import fp32_cpu_attention
from grpo_fast.train.kv_head_attention import kv_head_attention
from grpo_fast.train.layout_cost import CACHED_OVERHEAD  # noqa: F401 (re-exported: the layouts' threshold)
from grpo_fast.train.rollout_batch import SequenceBatch


@contextlib.contextmanager
def _cpu_attention(enabled: bool):
    """HF's sdpa attention in the training forward on the CPU: the native op (cpu_attention.py)
    inside, the bf16 -> fp32 cast (fp32_attention.py) around it, so half-precision rows reach the
    op in fp32. Off under gradient checkpointing (the recompute runs outside the context)."""
    with native_cpu_attention(enabled=enabled), fp32_cpu_attention(enabled=enabled):
        yield


def completion_hidden(decoder, batch: SequenceBatch, *, share_prompts: bool = True, layout: str = "auto",
                      prefix: PromptPrefix | None = None) -> torch.Tensor:
    """Final-norm hidden states that predict each completion token: [N, C, H]. decoder: the
    causal LM's decoder stack (grpo_fast.models.causal_lm.decoder_and_head).

    share_prompts=True runs each prompt once for all the rows that repeat it (a group's G
    completions), with no padding, in one of two layouts (the same math either way):

    - packed (SDPA / eager attention): each run of rows with one prompt becomes a single sequence
      [prompt | c_1[:-1] | c_2[:-1] | ... ] with a block mask: prompt tokens are causal among
      themselves, completion i sees the whole prompt and its own earlier tokens only, and its
      positions continue from the prompt's. B·P + N·(C-1) tokens instead of N·(P + C), in larger
      GEMMs, with one K/V per group, and it works under gradient checkpointing.
    - cached (flash-attention, whose kernels take no custom mask): the prompt runs once with a
      cache, its K/V is repeated along the batch for its rows, then the completions run over it
      (HF's flash path unpads the rows itself: varlen). Falls back to the plain pass under
      gradient checkpointing, where HF drops caches.

    Gradients reach the prompt positions from every completion that attends to them, as in the
    plain pass. Positions past a row's completion (right padding) come back as zeros. A model with
    a sliding window gets the plain pass when a row is longer than the window (the block mask has
    no window; shorter rows never reach it).
    layout: "auto", "packed" or "cached". auto: cached under flash-attention; otherwise packed
    unless the packed block mask's extra attention outweighs the cached layout's overhead
    (`cached_pays`: long completions after short prompts, where a group's packed sequence is
    long and its dense T x T attention mostly masked), and never cached under gradient
    checkpointing.
    prefix: the rows' prompts already run (grpo_fast.train.group_prompts: a group split across
    micro-batches runs its prompt once for all of them); only the completions run here.

    Attention over bf16 / fp16 CPU tensors computes in fp32 (fp32_attention.py: faster there), on
    the CPU in the native training attention (cpu_attention.py).
    """
    checkpointed = is_checkpointed(decoder)
    with _cpu_attention(enabled=not checkpointed):
        return _completion_hidden(decoder, batch, share_prompts=share_prompts, layout=layout, prefix=prefix,
                                  checkpointed=checkpointed)


def _completion_hidden(decoder, batch: SequenceBatch, *, share_prompts: bool, layout: str,
                       prefix: PromptPrefix | None, checkpointed: bool) -> torch.Tensor:
    if prefix is not None:
        return completions_over_prefix(decoder, batch, prefix)
    if layout not in ("auto", "packed", "cached"):
        raise ValueError(f"layout must be auto, packed or cached, got {layout!r}")
    P = batch.prompt_width
    runs = prompt_runs(batch.input_ids[:, :P]) if share_prompts else None
    config = getattr(decoder, "config", None)
    if runs is not None and exceeds_window(config, batch):
        runs = None  # a row longer than the sliding window: HF's own masks (plain pass) apply it
    attn = attention_implementation(config)
    if getattr(decoder, "collective", False) and runs is not None:
        layout = "packed"  # one decoder call on every rank (FSDP's gathers), whatever the rank's rows
    if layout == "auto" and runs is not None and not attn.startswith("flash"):
        layout = "cached" if not checkpointed and cached_pays(config, batch, runs) else "packed"
    if runs is not None and layout == "packed":
        return _packed_forward(decoder, batch, runs)
    if runs is None or len(runs) == len(batch) or checkpointed:
        return _plain_forward(decoder, batch)
    return _cached_prompt_forward(decoder, batch, runs)


def cached_pays(config, batch: SequenceBatch, runs: list[int]) -> bool:
    """Whether the cached layout beats the packed one on this batch, by attention work
    (layout_cost.cached_pays, on the batch's real prompt and completion lengths)."""
    if config is None or not getattr(config, "hidden_size", None):
        return False
    h = config.hidden_size
    heads = config.num_attention_heads
    P, C = batch.prompt_width, batch.targets.shape[1]
    groups = [(prompt, count, completions) for _, count, prompt, completions in run_lengths(batch, runs)]
    return layout_cost.cached_pays(
        hidden=h, q_heads=heads, head_dim=getattr(config, "head_dim", None) or h // heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=getattr(config, "intermediate_size", 4 * h), prompt_width=P, completion_width=C, runs=groups)


def run_lengths(batch: SequenceBatch, runs: list[int]) -> list[tuple[int, int, int, int]]:
    """Per run of rows sharing a prompt: (its first row, its rows, its prompt's real tokens, the
    tokens its completions run: Σ max(c - 1, 0), the last token predicting nothing), the lengths
    layout_cost decides with."""
    P = batch.prompt_width
    real = batch.attention_mask.sum(1).tolist()  # [N] prompt + completion tokens of each row
    prompt_lens = batch.attention_mask[:, :P].sum(1).tolist()  # [N]
    out = []
    for first, count in zip(layout_cost.run_starts(runs), runs):
        p = prompt_lens[first]
        out.append((first, count, p, sum(max(real[i] - p - 1, 0) for i in range(first, first + count))))
    return out


def attention_implementation(config) -> str:
    """The model's attention implementation (HF's config._attn_implementation), sdpa when unset."""
    return getattr(config, "_attn_implementation", "sdpa") or "sdpa"


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, the dtype's most negative value elsewhere (same shape)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _plain_forward(decoder, batch: SequenceBatch) -> torch.Tensor:
    """Every row in full, [N, P + C] -> [N, C, H]."""
    P, C = batch.prompt_width, batch.targets.shape[1]
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state[:, P - 1:P - 1 + C]


def _packed_forward(decoder, batch: SequenceBatch, runs: list[int]) -> torch.Tensor:
    """One packed sequence per run of rows sharing a prompt (see completion_hidden)."""
    P, C = batch.prompt_width, batch.targets.shape[1]
    device = batch.input_ids.device
    real = batch.attention_mask.sum(1).tolist()  # [N] prompt + completion tokens of each row
    prompt_lens = batch.attention_mask[:, :P].sum(1).tolist()  # [N]
    rows_ids = batch.input_ids.tolist()
    seqs, segs, poss = [], [], []  # per run: token ids, segment ids, positions
    where = []  # per row: C packed indices (run, t) of the hidden states predicting its targets
    row = 0
    for r, count in enumerate(runs):
        lp = prompt_lens[row]
        tokens, seg, pos = rows_ids[row][P - lp:P], [-1] * lp, list(range(lp))
        for i in range(row, row + count):
            lc = real[i] - lp  # completion length; its last token predicts nothing
            inputs = max(lc - 1, 0)
            where.append([(r, lp - 1)] + [(r, len(tokens) + t) for t in range(inputs)] + [(r, -1)] * (C - 1 - inputs))
            tokens += rows_ids[i][P:P + inputs]
            seg += [i] * inputs
            pos += range(lp, lp + inputs)  # positions continue from the prompt's
        seqs.append(tokens)
        segs.append(seg)
        poss.append(pos)
        row += count
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(runs), T), dtype=torch.long)  # [R, T]
    seg_ids = torch.full((len(runs), T), -2, dtype=torch.long)  # -2 padding, -1 prompt, i = row i
    positions = torch.zeros((len(runs), T), dtype=torch.long)
    for r, (s, g, q) in enumerate(zip(seqs, segs, poss)):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        seg_ids[r, :len(g)] = torch.tensor(g, dtype=torch.long)
        positions[r, :len(q)] = torch.tensor(q, dtype=torch.long)
    # [R, 1, T, T] additive mask: causal in packed order; a completion token sees the prompt and
    # its own segment; padding sees only padding (never an empty row, which would give NaN).
    sq, sk = seg_ids[:, :, None], seg_ids[:, None, :]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & ((sk == sq) | ((sk == -1) & (sq != -2)))
    dtype = decoder.get_input_embeddings().weight.dtype
    mask = _additive_mask(allowed, dtype)
    out = decoder(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                  position_ids=positions.to(device), use_cache=False).last_hidden_state  # [R, T, H]
    flat = torch.cat([out.reshape(-1, out.shape[-1]), out.new_zeros(1, out.shape[-1])])  # [R*T + 1, H]
    zero = flat.shape[0] - 1  # padding targets read the zero row
    index = torch.tensor([[r * T + t if t >= 0 else zero for r, t in w] for w in where], device=device)  # [N, C]
    return flat[index]  # [N, C, H]


@dataclass
class PromptPrefix:
    """What completions need of their prompt, for n rows: the prompt's K/V at every layer
    (keys[l], values[l]: [n, Hkv, P, D]) and the final-norm hidden state of its last position
    ([n, 1, H]: it predicts the first completion token)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor

    def map(self, fn) -> "PromptPrefix":
        """The same prefix with `fn` applied to every tensor (repeat for rows, detach, ...)."""
        return PromptPrefix([fn(k) for k in self.keys], [fn(v) for v in self.values], fn(self.last_hidden))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.last_hidden]


def run_prompts(decoder, batch: SequenceBatch, rows: torch.Tensor) -> PromptPrefix:
    """The prompts of batch rows `rows` [B'] through the decoder once, with a cache: [B'] prefixes."""
    P = batch.prompt_width
    cache = DynamicCache(config=getattr(decoder, "config", None))
    with _cpu_attention(enabled=not is_checkpointed(decoder)):
        out = decoder(input_ids=batch.input_ids[rows, :P], attention_mask=batch.attention_mask[rows, :P],
                      position_ids=batch.position_ids[rows, :P], past_key_values=cache, use_cache=True)
    return PromptPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                        out.last_hidden_state[:, -1:])  # [B', 1, H]


def completions_over_prefix(decoder, batch: SequenceBatch, prefix: PromptPrefix) -> torch.Tensor:
    """Completion tokens 0..C-2 (the last one predicts nothing) over each row's prompt K/V:
    [N, C, H], row i's first position being its prompt's last hidden state. `prefix` has one
    row per batch row; gradients reach its tensors (and through them the prompt's pass).
    Attention takes K/V at their own heads on the CPU (kv_head_attention.py)."""
    P, C = batch.prompt_width, batch.targets.shape[1]
    if C == 1:
        return prefix.last_hidden
    cache = DynamicCache(config=getattr(decoder, "config", None))
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        cache.update(k, v, layer)
    mask = batch.attention_mask[:, :P + C - 1]  # [N, P+C-1]: flash-attention's varlen kernels unpad by it
    if attention_implementation(getattr(decoder, "config", None)) in ("sdpa", "eager"):  # one additive mask for every layer
        mask = completion_mask(mask, P, decoder.get_input_embeddings().weight.dtype)  # [N, 1, C-1, P+C-1]
    # K/V at their own heads on the CPU (each row's copy of its prompt's, not repeated to every
    # query head: kv_head_attention.py); not under gradient checkpointing (HF drops caches there anyway)
    with kv_head_attention(enabled=not is_checkpointed(decoder)):
        out = decoder(input_ids=batch.input_ids[:, P:P + C - 1], attention_mask=mask.to(batch.input_ids.device),
                      position_ids=batch.position_ids[:, P:P + C - 1], past_key_values=cache, use_cache=True)
    return torch.cat([prefix.last_hidden, out.last_hidden_state], dim=1)  # [N, C, H]


def completion_mask(attention_mask: torch.Tensor, prompt_width: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of completions over their cached prompt, [N, 1, T - P, T] from the rows'
    padding mask [N, T]: query t (position P + t) sees key j when j <= P + t and j is not padding.
    Built once in the model's dtype, so every layer's SDPA takes the same tensor (HF's bool mask
    was turned into a new float one, and saved, in each layer)."""
    T, P = attention_mask.shape[1], prompt_width
    causal = torch.ones(T - P, T, dtype=torch.bool, device=attention_mask.device).tril(P)  # [T-P, T]
    allowed = causal[None] & attention_mask[:, None, :].bool()  # [N, T-P, T]
    return _additive_mask(allowed, dtype)[:, None]  # [N, 1, T-P, T]


def _cached_prompt_forward(decoder, batch: SequenceBatch, runs: list[int]) -> torch.Tensor:
    """Prompt once with a cache, its K/V repeated for its rows, completions over it (see completion_hidden)."""
    counts = torch.tensor(runs, device=batch.input_ids.device)  # [B'] rows per distinct prompt
    firsts = counts.cumsum(0) - counts  # [B'] first row of each run
    prefix = run_prompts(decoder, batch, firsts)  # [B'] -> [N] rows, still differentiable
    return completions_over_prefix(decoder, batch, prefix.map(lambda t: t.repeat_interleave(counts, dim=0)))


def exceeds_window(config, batch: SequenceBatch) -> bool:
    """Whether a row of `batch` is longer than the model's sliding window (the shared-prompt
    layouts have no window; HF's own masks in the plain pass apply it)."""
    window = active_sliding_window(config)
    return window is not None and int(batch.attention_mask.sum(1).max()) > window


def is_checkpointed(decoder) -> bool:
    """Whether this forward runs under gradient checkpointing (training mode only), where HF drops caches."""
    return decoder.training and any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())


def prompt_runs(prompts: torch.Tensor) -> list[int] | None:
    """Lengths of the runs of equal consecutive rows of prompts [N, P] (a group's G rows)."""
    if prompts.shape[0] == 0:
        return None
    same = (prompts[1:] == prompts[:-1]).all(dim=1).tolist()  # [N-1]
    runs, length = [], 1
    for eq in same:
        if eq:
            length += 1
        else:
            runs.append(length)
            length = 1
    runs.append(length)
    return runs
