"""The memory plan: what a run will hold, per phase and per component, from its config and the
model's config alone (no weights loaded), before anything is allocated.

    plan = grpo_fast.memory.plan(cfg)                 # or: grpo-fast plan --config cfg.yaml
    plan.peak_bytes, plan.phases, plan.components     # bytes; plan.table() prints them
    grpo_fast.memory.fit(cfg, device_memory=24 * 2**30)   # the largest settings that fit

Phases of a step and what each holds on top of the resident set (weights, adapters, optimizer):
    sampling   the KV pool, the decode step's logits [S, V] and its per-layer temporaries
    scoring    (only with beta > 0 or num_iterations > 1) a micro-batch's forward without grad:
               one layer's activations at a time, the log-prob chunks
    training   a micro-batch's forward with grad: the activations autograd saves for every
               layer (every layer's input only, with gradient checkpointing, plus one layer's
               during its recompute), the fused loss's hidden states and chunks, the gradients

Sizes per token and layer are read off the modules the training pass runs (see _saved_per_token);
the constants that are not arithmetic (the runtime's own size, the allocator's slack) are
measured on this machine by benchmarks/bench_memory.py, which also checks the whole plan against
measured peaks (benchmarks/RESULTS.md "Memory plan").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from grpo_fast.errors import UserError
from grpo_fast.train import layout_cost

GiB = 2**30
MiB = 2**20

# Measured (benchmarks/bench_memory.py): the resident set of a process that has imported torch,
# transformers and peft (CPU); CUDA counts allocated device memory only, so none there.
CPU_RUNTIME_BYTES = 470 * MiB
# What a CUDA process holds on the device outside torch's allocator (the context, cuBLAS and
# kernel images): not in peak_bytes (allocated memory), but counted when checking a device size.
CUDA_CONTEXT_BYTES = 600 * MiB
# Allocator slack over the live tensors at a phase's peak (fragmentation, caching allocator). On
# the CPU the sampling phase's tensors are few and long-lived (the KV pool, the weights): none
# measured there; the training phase's many short-lived ones leave about 10%.
SLACK = {"cpu": 0.10, "cuda": 0.08}
SAMPLING_SLACK = {"cpu": 0.0, "cuda": 0.08}
# CPU only: within one forward + backward the glibc heap does not reuse all the per-layer
# temporaries it frees (their sizes change from op to op, and glibc's mmap threshold moves with
# them), so the resident set grows by about this share of the saved activations again; less with
# gradient checkpointing, whose recomputed layers free theirs one at a time. Measured by
# benchmarks/bench_memory.py over micro-batches of 167 to 2,107 tokens, 12 configs (benchmarks/
# RESULTS.md "Memory plan" and "Lean LoRA and SwiGLU"); CUDA's caching allocator reuses its
# blocks, so none there. With the native core's one-pass SwiGLU and RMSNorm (grpo_fast.swiglu,
# grpo_fast.rms_norm) far fewer odd-sized temporaries are left: 0.35 / 0.2 beside the process's
# own growth (CPU_PROCESS_GROWTH below; 0.4 / 0.2 when that was not counted apart); without the
# core (a source checkout), PyTorch's ops leave the 0.9 / 0.6 measured before them; bf16 / fp16
# below.
CPU_HEAP_GROWTH = {False: 0.35, True: 0.2}  # by gradient checkpointing
CPU_HEAP_GROWTH_TORCH_OPS = {False: 0.9, True: 0.6}
# A bf16 / fp16 model's training pass on the CPU leaves about the saved tensors again (our fp32
# attention and PyTorch's SwiGLU forward make fp32 / bf16 temporaries of 2-byte activations),
# little under gradient checkpointing (its recompute runs attention in bf16 and frees layer by
# layer); measured by bench_memory.py's bf16, bf16-long and bf16-checkpointing configs (with the
# bf16 one-pass RMSNorm: 1.10 / 1.05 / 0.97 of the measured peaks, 7 Dec 2026).
CPU_HEAP_GROWTH_HALF = {False: 1.0, True: 0.1}
# CPU, train.release_memory = step: the freed heap pages are not handed back between the micro-
# batches of a step, and each one's tensors fit the previous one's holes imperfectly; the resident
# set then peaked higher by about this share of one micro-batch's saved activations (on top of the
# growth above): 0.40-0.43 in fp32, 0.30 in bf16, SmolLM2-135M, micro-batches of 8 x (40 + 128)
# tokens (benchmarks/RESULTS.md, "When freed memory goes back").
CPU_HEAP_GROWTH_STEP_RELEASE = 0.45
# CPU only: what the process holds outside tensors once the model is built and has taken a step,
# in every phase after the first: the model's and tokenizer's Python objects (~34 MiB for
# SmolLM2-135M, ~54 MiB with NF4), the code pages the first update touches (~19 MiB of libtorch)
# and the heap it leaves that malloc_trim cannot return (~30 MiB in fp32, ~50 MiB in bf16).
# Measured by benchmarks/bench_memory.py (RESULTS.md "The memory plan's sampling phase"): the
# sampling phase read 42-61 MiB (fp32) and 86-99 MiB (bf16, NF4) above the plan without it.
CPU_PROCESS_GROWTH = {"fp32": 64 * MiB, "half": 100 * MiB}
# The CPU log-prob backend holds two fp32 [rows, V] buffers of at most this many rows and bytes
# (grpo_fast logprob_cpu: CHUNK_BYTES, MAX_CHUNK_ROWS); the Triton kernels tile the vocabulary.
CPU_CHUNK_ROWS, CPU_CHUNK_BYTES = 256, 160 * MiB


@functools.cache
def _native_core_built() -> bool:
    """Whether grpo_fast._C is there (without importing it, or torch); fixed for the process."""
    import importlib.util
    return importlib.util.find_spec("grpo_fast._C") is not None


def _logit_rows(tokens: int, vocab: int, device: str) -> int:
    """Rows of [*, V] fp32 logits the log-prob pass holds at once."""
    if device == "cuda":
        return 0
    return min(tokens, CPU_CHUNK_ROWS, max(1, CPU_CHUNK_BYTES // (4 * vocab)))


@dataclass
class ModelShape:
    """What the plan needs of a model, read off its config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, c) -> ModelShape:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                   layers=c.num_hidden_layers, q_heads=c.num_attention_heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim=head_dim,
                   tied=bool(getattr(c, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each block linear, as LoRA targets them."""
        h, q, kv, i = self.hidden, self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embedding, LM head (unless tied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


@dataclass
class MemoryPlan:
    device: str
    peak_bytes: int
    peak_phase: str
    phases: dict[str, int]
    components: dict[str, int]
    notes: list[str] = field(default_factory=list)
    overhead_bytes: int = 0  # held on the device outside peak_bytes (CUDA: the context)

    def table(self) -> str:
        lines = [f"memory plan ({self.device}): peak {_fmt(self.peak_bytes)} in {self.peak_phase}", "",
                 "  component                        bytes"]
        lines += [f"  {name:<30} {_fmt(b):>10}" for name, b in self.components.items()]
        lines += ["", "  phase                            peak"]
        lines += [f"  {name:<30} {_fmt(b):>10}" for name, b in self.phases.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def fits(self, device_memory: int) -> bool:
        return self.peak_bytes + self.overhead_bytes <= device_memory


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _dtype_bytes(name: str, device: str) -> int:
    if name == "auto":
        return 2 if device == "cuda" else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def plan_device(cfg) -> str:
    """"cuda" or "cpu": where the run's model will live."""
    if cfg.model.device != "auto":
        return "cuda" if cfg.model.device.startswith("cuda") else "cpu"
    import sys

    if "torch" in sys.modules:  # the trainer: ask torch itself
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    return "cuda" if _torch_has_cuda() and Path("/proc/driver/nvidia/gpus").is_dir() and any(
        Path("/proc/driver/nvidia/gpus").iterdir()) else "cpu"


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from its version.py without importing
    torch (2 s on a small CPU: `grpo-fast plan` answers without it)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = version.read_text()
    except OSError:
        return False
    return "cuda: Optional[str] = None" not in text and "cuda = None" not in text


def read_shape(model_cfg) -> ModelShape:
    """The model's shape from its config file only (a folder's config.json, read as JSON without
    importing transformers, so `grpo-fast plan` answers at once; a GGUF header through
    transformers; or the default model's)."""
    import json
    from types import SimpleNamespace

    from grpo_fast.models.source import model_source as _source

    folder, gguf = _source(model_cfg)
    if gguf is None:
        fields = json.loads((Path(folder) / "config.json").read_text())
        needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if all(k in fields for k in needed):  # a flat decoder config (else: let transformers read it)
            return ModelShape.from_config(SimpleNamespace(**fields))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    return ModelShape.from_config(config)


def kv_bytes_per_token(shape: ModelShape, cfg) -> int:
    """K and V of every layer for one token, in the compute dtype."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * _dtype_bytes(cfg.model.dtype, plan_device(cfg))


def _saved_per_token(s: ModelShape, r: int, lora_targets: int) -> int:
    """Elements autograd keeps per token and layer in the training forward (LoRA on the block
    linears, the lean SwiGLU of grpo_fast.swiglu, SDPA attention, RMSNorm), as its saved-tensor
    hooks list them for SmolLM2:
        the two norms' inputs and outputs (4 H) and inverse RMS (2)
        attention: q after RoPE, K and V repeated to the query heads (HF does under a mask), the
        output (H_q each), the logsumexp (one per head)
        the MLP's gate and up (2 I: silu is recomputed) and down's input (I)
        per LoRA layer: x A^T (r), the input of B
    (SmolLM2-135M, r = 16 on the 7 linears: 9,339 elements; autograd's saved tensors count 9,350.)"""
    return 4 * s.hidden + 2 + _attention_saved_per_token(s) + 3 * s.intermediate + lora_targets * r


def _attention_saved_per_token(s: ModelShape) -> int:
    """SDPA's part of _saved_per_token: q, K and V at the query heads, the output, the logsumexp."""
    return 4 * s.q_heads * s.head_dim + s.q_heads


def _attention_bytes(cfg, device: str, act: int) -> int:
    """Bytes per element of what SDPA keeps: fp32 for a half-precision model on the CPU outside
    gradient checkpointing (grpo_fast/train/fp32_attention.py casts q, k, v up), else `act`."""
    return 4 if device == "cpu" and act == 2 and not cfg.model.gradient_checkpointing else act


def _cached_kv_heads(s: ModelShape, device: str) -> int:
    """The heads K/V reach SDPA with where completions attend over a cached prompt: their own on
    the CPU (grpo_fast/train/kv_head_attention.py), repeated to the query heads elsewhere."""
    return s.kv_heads if device == "cpu" else s.q_heads


def _cached_layout_kv_per_layer(s: ModelShape, rows: int, prompts: int, prompt: int, completion: int,
                                device: str) -> int:
    """K/V elements a layer's SDPA keeps for the backward when `rows` completions attend over their
    `prompts` prompts run once with a cache (the cached and group-prompts layouts), in place of
    the packed count's repeated K/V (2 H_q per token in _saved_per_token):
        the prompts' own pass, unmasked: their K/V at the K/V heads (prompts of unequal length are
        masked, and repeat theirs)
        the completions' pass: each row's own copy of its prompt's K/V ahead of its completion's,
        at the heads SDPA gets them there (_cached_kv_heads)
    The mask [rows, 1, C-1, P+C-1] is built once (packed_forward.completion_mask); the plan adds it
    to the activations. Checked against autograd's saved tensors beyond the packed count, SmolLM2
    + LoRA r = 16, planned / counted: 79.6 / 80.2 MiB at 1,024 + 4 x 32 tokens, 46.0 / 46.2 at
    256 + 8 x 32 (with K/V repeated and HF's mask in every layer, before kv_head_attention and
    completion_mask: 465.0 / 460.0 and 255.6 / 254.7)."""
    P, C, D = prompt, max(completion - 1, 0), s.head_dim
    return rows * (P + C) * 2 * _cached_kv_heads(s, device) * D + prompts * P * 2 * s.kv_heads * D


def plan(cfg, device_memory: int | None = None, *, shape: ModelShape | None = None,
         prompt_tokens: int | None = None, world_size: int | None = None) -> MemoryPlan:
    """The plan of `cfg` (a Config). prompt_tokens: the longest prompt (default:
    sampling.max_prompt_length, the most a prompt may have). shape: the model's (default: read
    from its config file). device_memory, when given, adds a note on whether it fits.
    world_size: the ranks a train.fsdp run shards over (default: this run's, 1 without torchrun);
    cfg is then one rank's share of the step (train/data_parallel.rank_config)."""
    device = plan_device(cfg)
    shape = shape or read_shape(cfg.model)
    s, t, sp, lc = shape, cfg.train, cfg.sampling, cfg.loss
    act = _dtype_bytes(cfg.model.dtype, device)  # activations and weights in the compute dtype
    prompt = prompt_tokens or sp.max_prompt_length
    completion = sp.max_completion_length
    G, B = sp.num_generations, t.prompts_per_step
    rows = B * G
    comp: dict[str, int] = {}
    overhead = CUDA_CONTEXT_BYTES if device == "cuda" else 0

    # ---- resident for the whole run
    comp["runtime"] = CPU_RUNTIME_BYTES if device == "cpu" else 0
    if cfg.model.load_in_4bit:
        # NF4: 4 bits per weight, an 8-bit absmax per 64 weights, an fp32 constant per 256 absmax
        nf4 = s.block_linear_params * (0.5 + 1 / 64 + 4 / (64 * 256))
        comp["weights"] = int(nf4 + s.other_params * act)
    else:
        comp["weights"] = (s.block_linear_params + s.other_params) * act
    optim = t.optim if t.optim != "auto" else ("adamw_8bit" if device == "cuda" else "adamw")
    full = not cfg.lora.enabled
    targets = [] if full else (cfg.lora.target_modules or list(s.linears()))
    shards = _shards(cfg, world_size)
    gathered_training = gathered_sampling = 0
    if full:  # every weight trains: its gradient and AdamW state in the weights' dtype; 1/W each under FSDP
        n = s.block_linear_params + s.other_params
        comp["weights"] = -(-n * act // shards)
        comp["gradients"] = comp["weights"]
        comp["optimizer state"] = -(-n * (2 if optim.endswith("8bit") else 2 * act) // shards)
        if lc.beta > 0:
            comp["reference copy"] = comp["weights"]  # the frozen starting weights (sharded alike)
        if shards > 1:  # gathered on top of the shard: the root unit and two layers (FSDP prefetches
            # the next) while training; every weight while sampling
            layer = s.block_linear_params // s.layers + 2 * s.hidden
            gathered_training = (s.other_params + 2 * layer) * act
            gathered_sampling = n * act - comp["weights"]
        grads = comp["gradients"]
    else:
        lora_params = s.layers * sum(cfg.lora.r * (a + b) for name, (a, b) in s.linears().items() if name in targets)
        comp["lora adapters"] = lora_params * 4  # fp32 (peft keeps adapters in fp32)
        comp["lora gradients"] = lora_params * 4
        comp["optimizer state"] = lora_params * (2 if optim.endswith("8bit") else 8)
        grads = comp["lora gradients"]
    resident = sum(comp.values())
    if gathered_training:
        comp["gathered layers (fsdp)"] = gathered_training

    # ---- training: a micro-batch's packed forward with grad
    mb_rows = t.micro_batch_size or rows
    budget = t.micro_batch_tokens
    if budget == "auto":
        budget = token_budget(cfg, device_memory, shape=s, prompt_tokens=prompt) if device_memory else None
    if budget is not None:  # by tokens: as many full-length completions as the budget packs (one at least)
        mb_rows = _rows_within(int(budget), prompt, completion, G, rows)
    groups_in_mb = max(1, math.ceil(mb_rows / G))
    mb_tokens = _packed_tokens(mb_rows, prompt, completion, G)  # packed: prompt once per group
    lora_per_layer = len([n for n in s.linears() if n in targets])
    attn = _attention_bytes(cfg, device, act)
    per_token_layer = (_saved_per_token(s, cfg.lora.r, lora_per_layer) * act
                       + _attention_saved_per_token(s) * (attn - act))
    if cfg.model.gradient_checkpointing:
        saved = mb_tokens * s.layers * s.hidden * act + mb_tokens * per_token_layer  # inputs + one layer
    else:
        saved = mb_tokens * s.layers * per_token_layer
    mask = groups_in_mb * (mb_tokens / groups_in_mb) ** 2 * act  # the packed block mask [R, 1, T, T]
    layout = layout_cost.training_layout(
        hidden=s.hidden, q_heads=s.q_heads, head_dim=s.head_dim, kv_heads=s.kv_heads, intermediate=s.intermediate,
        prompt=prompt, completion=completion, generations=G, rows=rows, micro_batch=mb_rows,
        shares_prompts=not cfg.model.gradient_checkpointing and shards == 1)
    heap_basis = mb_tokens * s.layers * per_token_layer  # what the forward saves, checkpointed or not
    if layout != "packed":  # the completions' SDPA keeps each row's own copy of its prompt's K/V
        kv_saved = _cached_layout_kv_per_layer(s, mb_rows, groups_in_mb, prompt, completion, device) * s.layers * attn
        comp["attention K/V (cached prompt)"] = int(kv_saved)
        saved -= mb_tokens * s.layers * 2 * s.q_heads * s.head_dim * attn  # the packed count's repeated K/V
        c = max(completion - 1, 0)
        mask = mb_rows * c * (prompt + c) * act  # [rows, 1, C-1, P+C-1], once for every layer
        heap_basis = saved + kv_saved
    comp["training activations"] = int(saved + mask)
    loss_tokens = mb_rows * completion
    comp["fused loss"] = loss_tokens * s.hidden * 4 * 2 + 2 * _logit_rows(loss_tokens, s.vocab, device) * s.vocab * 4
    backward_temps = mb_tokens * (2 * s.intermediate + 2 * s.hidden) * 4  # one layer's gradients in flight
    if device == "cpu":
        # the fp32 one-pass kernels, else PyTorch's ops (no core), else bf16 / fp16's own constants
        lean = _native_core_built() and act == 4
        growth = (CPU_HEAP_GROWTH if lean else CPU_HEAP_GROWTH_TORCH_OPS if act == 4 else
                  CPU_HEAP_GROWTH_HALF)[bool(cfg.model.gradient_checkpointing)]
        if cfg.train.release_memory == "step":
            growth += CPU_HEAP_GROWTH_STEP_RELEASE
        comp["heap growth (cpu)"] = int(growth * heap_basis)
        half = act != 4 or cfg.model.load_in_4bit  # weights converted at load: NF4 or bf16 / fp16
        comp["process growth (cpu)"] = CPU_PROCESS_GROWTH["half" if half else "fp32"]
    training = (resident + comp["training activations"] + comp.get("attention K/V (cached prompt)", 0)
                + comp["fused loss"] + backward_temps + comp.get("heap growth (cpu)", 0) + gathered_training)
    process = comp.get("process growth (cpu)", 0)
    training += process

    # ---- sampling: the KV pool plus a decode step's logits and temporaries
    kv_per_token = kv_bytes_per_token(s, cfg)
    kv_tokens = _kv_pool_tokens(cfg, prompt, kv_per_token)
    if sp.kv_budget == "auto" and device_memory is not None:  # what the training peak leaves (the trainer's rule)
        spare = device_memory - int(training * (1 + SLACK[device])) - overhead
        kv_tokens = max(0, min(kv_tokens, spare // kv_per_token))
    comp["kv cache"] = kv_tokens * kv_per_token
    comp["sampler logits"] = rows * s.vocab * 4 * 2  # fp32 logits + the sampling kernel's workspace
    decode_temps = rows * (4 * s.hidden + 2 * s.intermediate) * act
    if gathered_sampling:
        comp["gathered weights (fsdp sampling)"] = gathered_sampling
    if (device == "cpu" and cfg.model.dtype == "bfloat16" and not cfg.model.load_in_4bit
            and sp.backend != "hf"):  # the sampler's oneDNN-packed copy of the block linears and LM head
        comp["packed weights (bf16 sampling)"] = (s.block_linear_params + s.vocab * s.hidden) * 2
    sampling = (resident - grads + comp["kv cache"] + comp["sampler logits"] + decode_temps + gathered_sampling
                + comp.get("packed weights (bf16 sampling)", 0) + process)

    # ---- scoring: old / reference log-probs, no grad
    scoring = 0
    if lc.beta > 0 or lc.num_iterations > 1:
        scoring = (resident - grads + gathered_training + mb_tokens * (4 * s.hidden + 2 * s.intermediate) * act
                   + int(mask) + 2 * _logit_rows(loss_tokens, s.vocab, device) * s.vocab * 4
                   + rows * completion * 4 * 2 + process)

    slack = 1 + SLACK[device]
    phases = {"sampling": int(sampling * (1 + SAMPLING_SLACK[device])), "training": int(training * slack)}
    if scoring:
        phases["scoring"] = int(scoring * slack)
    peak_phase = max(phases, key=phases.get)
    notes = [f"micro-batch: {mb_rows} completions, {mb_tokens} tokens ({layout} layout); KV pool {kv_tokens} tokens",
             f"optimizer {optim}; " + (f"full fine-tuning, every weight trains" + (
                 f", sharded across {shards} ranks (FSDP2)" if shards > 1 else "") if full else
                 f"lora r={cfg.lora.r} on {', '.join(t_ for t_ in s.linears() if t_ in targets)}")]
    longest = prompt + completion
    if kv_tokens < longest:
        notes.append(f"the KV pool ({kv_tokens} tokens) cannot hold one sequence of {longest} tokens: the sampler "
                      f"cannot run; lower sampling.max_completion_length or free memory")
    elif kv_tokens < step_pool_tokens(cfg, prompt):
        held = _sequences_held(kv_tokens, prompt, completion, G, rows)
        notes.append(f"the KV pool holds {held} of the step's {rows} sequences at full length at once (each group's "
                     f"prompt shared): the sampler preempts and recomputes the rest")
    if overhead:
        notes.append(f"plus ~{_fmt(overhead)} of CUDA context outside the allocator (counted against a device size)")
    result = MemoryPlan(device, phases[peak_phase], peak_phase, phases, comp, notes, overhead)
    if device_memory is not None:
        verdict = "fits" if result.fits(device_memory) else "does NOT fit"
        result.notes.append(f"{verdict} in {_fmt(device_memory)}")
    return result


def _shards(cfg, world_size: int | None = None) -> int:
    """How many ranks share a full fine-tuning run's weights: the world size under torchrun with
    train.fsdp, else 1."""
    if cfg.lora.enabled or not cfg.train.fsdp:
        return 1
    if world_size is not None:
        return world_size
    from grpo_fast import distributed

    return distributed.world_size()


def _packed_tokens(n: int, prompt: int, completion: int, G: int) -> int:
    """Packed tokens of n full-length completions taken in order: each group's prompt once."""
    return max(1, math.ceil(n / G)) * prompt + n * max(completion - 1, 0)


def _rows_within(budget: int, prompt: int, completion: int, G: int, rows: int) -> int:
    """The most full-length completions (at least 1, at most rows) whose packed tokens fit budget."""
    n = 1
    while n < rows and _packed_tokens(n + 1, prompt, completion, G) <= budget:
        n += 1
    return n


def _kv_pool_tokens(cfg, prompt: int, kv_per_token: int) -> int:
    """The tokens of KV the trainer's sampler pool holds: sampling.kv_budget when it is a size (in
    tokens or bytes), else (None, auto) what one step's generate call needs at once (what the
    trainer asks for; auto is then capped by what the device leaves)."""
    budget = cfg.sampling.kv_budget
    if budget not in (None, "auto"):
        from grpo_fast.sampler.kv_budget import budget_tokens

        return budget_tokens(budget, bytes_per_token=kv_per_token)
    return step_pool_tokens(cfg, prompt)


def step_pool_tokens(cfg, prompt: int, *, prompts: int | None = None) -> int:
    """KV tokens for a step's generate call: `prompts` groups (default train.prompts_per_step, a
    rank's share under torchrun) x sampling.num_generations completions of up to
    max(sampling, eval max_completion_length) tokens after prompts of up to `prompt` tokens, each
    group's prompt shared (shared_pool_tokens)."""
    s = cfg.sampling
    completion = max(s.max_completion_length, cfg.eval.max_completion_length or 0)
    return shared_pool_tokens(prompts or cfg.train.prompts_per_step, s.num_generations, prompt, completion)


def _sequences_held(pool_tokens: int, prompt: int, completion: int, G: int, rows: int) -> int:
    """How many of a step's sequences a pool of `pool_tokens` holds at full length at once, taken
    as whole groups of G and then a part of one (at least one: the caller checked that one fits)."""
    def fits(k: int) -> bool:
        whole, part = divmod(k, G)
        need = shared_pool_tokens(whole, G, prompt, completion) + (shared_pool_tokens(1, part, prompt, completion)
                                                                    if part else 0)
        return need <= pool_tokens

    lo, hi = 1, rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# Tokens per KV block of the trainer's sampler: Sampler's default block_size (a test holds them equal;
# this module stays free of torch, which the sampler imports).
SAMPLER_BLOCK_SIZE = 16


def group_blocks(prompt: int, completion: int, generations: int, block_size: int = SAMPLER_BLOCK_SIZE) -> int:
    """KV blocks one group holds in the paged sampler once each of its `generations` sequences has
    `completion` tokens after its `prompt`-token prompt (prefilled once, then forked). The prompt's
    full blocks are shared; each sequence owns the rest of its blocks (copy-on-write gives all but
    one their own copy of the prompt's last, partly filled block). With b = block_size,
    G = generations, p = prompt, C = completion:

        floor(p / b) + G * (ceil((p + C) / b) - floor(p / b))

    (a sequence writes K/V for at most C - 1 of its tokens, the last one is never fed back: this
    counts C, at most one block per sequence over)."""
    shared = prompt // block_size
    return shared + generations * (-(-(prompt + completion) // block_size) - shared)


def group_peak_blocks(prompt: int, completion: int, generations: int, block_size: int = SAMPLER_BLOCK_SIZE) -> int:
    """The most blocks a group with a prompt of AT MOST `prompt` tokens holds (group_blocks over
    every prompt length p <= prompt). group_blocks(p + b) = group_blocks(p) + 1, so the largest
    lies among the last b lengths; it is not always p = prompt (a prompt that just fills a block
    shares all of it)."""
    lengths = range(max(1, prompt - block_size + 1), prompt + 1)
    return max(group_blocks(p, completion, generations, block_size) for p in lengths)


def shared_pool_tokens(groups: int, generations: int, prompt: int, completion: int,
                       block_size: int = SAMPLER_BLOCK_SIZE) -> int:
    """Tokens of KV that run one generate call of `groups` prompts x `generations` completions
    without a preemption: every group at its peak (group_peak_blocks), plus the one free block
    per sequence the scheduler keeps for its next token. Prompts that share a head across groups
    (a common system message) need less; that is not counted. Without the sharing, a call of
    B x G sequences needs B x G x (P + C): 4x more at P = 1,024, C = 128, G = 8."""
    blocks = groups * (group_peak_blocks(prompt, completion, generations, block_size) + generations)
    return blocks * block_size


# Each knob the fit search turns, one at a time, the others as configured: (section.field, ceiling).
KNOBS = (("train.prompts_per_step", 1024), ("sampling.num_generations", 256),
         ("sampling.max_completion_length", 131072), ("train.micro_batch_size", 4096))


def fit(cfg, device_memory: int, *, shape: ModelShape | None = None, prompt_tokens: int | None = None,
        world_size: int | None = None) -> dict:
    """For each knob, the largest value that fits `device_memory` with the others as configured
    (None: not even the smallest fits). The plan is arithmetic, so the search is instant."""
    import copy

    shape = shape or read_shape(cfg.model)
    out = {}
    for knob, ceiling in KNOBS:
        section, name = knob.split(".")
        floor = 2 if name == "num_generations" else 1

        def fits(value: int) -> bool:
            trial = copy.deepcopy(cfg)
            setattr(getattr(trial, section), name, value)
            if name == "micro_batch_size" and value > trial.train.prompts_per_step * trial.sampling.num_generations:
                return False
            return plan(trial, shape=shape, prompt_tokens=prompt_tokens, world_size=world_size).fits(device_memory)

        if not fits(floor):
            out[knob] = None
            continue
        lo, hi = floor, ceiling
        while lo < hi:  # largest value that fits: plan peaks grow with every knob
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        out[knob] = lo
    return out


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '24g', '1e9' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise MemoryPlanError(f"memory size: {text!r} is not a size like 24GiB or 16GB")
    unit = m.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def device_capacity(device: str) -> int | None:
    """The memory this process may use: the CUDA device's total memory, or on the CPU the
    cgroup's memory.max / the address-space rlimit when one is set (None: no limit known);
    GRPO_FAST_MEMORY_LIMIT (e.g. 16GiB) lowers either, for a share of a machine."""
    import os

    limits = [parse_size(os.environ["GRPO_FAST_MEMORY_LIMIT"])] if os.environ.get("GRPO_FAST_MEMORY_LIMIT") else []
    if device == "cuda":
        import torch

        total = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        return min(limits + [total])
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge sentinel: no limit
            limits.append(int(text))
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(int(soft))
    return min(limits) if limits else None


class MemoryPlanError(UserError, ValueError):
    """The plan does not fit the device; the message carries the plan and settings that fit."""


def check_fits(cfg, shape: ModelShape, capacity: int | None) -> MemoryPlan:
    """The plan of cfg; MemoryPlanError before anything is loaded when it exceeds `capacity`."""
    result = plan(cfg, capacity, shape=shape)
    if capacity is not None and not result.fits(capacity):
        found = fit(cfg, capacity, shape=shape)
        hints = ", ".join(f"{k}={v}" for k, v in found.items() if v is not None) or "a smaller model or 4-bit"
        raise MemoryPlanError(f"memory: the plan needs {_fmt(result.peak_bytes)} in {result.peak_phase}, the device "
                              f"has {_fmt(capacity)}; settings that fit (one at a time): {hints}; or turn on "
                              f"model.gradient_checkpointing / train.micro_batch_tokens.\n{result.table()}")
    return result


def token_budget(cfg, capacity: int | None, *, shape: ModelShape, prompt_tokens: int | None = None) -> int:
    """train.micro_batch_tokens: auto -> the largest packed-token budget whose training peak fits
    `capacity` (unknown capacity: the tokens micro_batch_size completions take at full length).
    With sampling.kv_budget auto as well, the budget first leaves room for a whole step's KV pool
    (the pool is what the training peak leaves), so the sampler need not preempt; when nothing
    fits that way, the training side takes what it needs and the pool gets the rest."""
    import copy

    prompt = prompt_tokens or cfg.sampling.max_prompt_length
    G, C = cfg.sampling.num_generations, cfg.sampling.max_completion_length
    rows = cfg.train.micro_batch_size or cfg.train.prompts_per_step * G
    if capacity is None:
        return _packed_tokens(rows, prompt, C, G)
    trial = copy.deepcopy(cfg)
    trial.train.micro_batch_tokens = None
    reserve, overhead = 0, CUDA_CONTEXT_BYTES if plan_device(cfg) == "cuda" else 0
    if cfg.sampling.kv_budget == "auto":
        per_token = kv_bytes_per_token(shape, cfg)
        reserve = int(_kv_pool_tokens(cfg, prompt, per_token) * per_token * (1 + SLACK[plan_device(cfg)]))
    for room in ([capacity - reserve, capacity] if reserve else [capacity]):
        best = None
        for n in range(1, cfg.train.prompts_per_step * G + 1):  # micro-batches of n completions at full length
            trial.train.micro_batch_size = n
            if plan(trial, shape=shape, prompt_tokens=prompt).phases["training"] + overhead > room:
                break
            best = _packed_tokens(n, prompt, C, G)
        if best is not None:
            return best
    raise MemoryPlanError(f"train.micro_batch_tokens: not even one completion of {C} tokens fits "
                          f"{_fmt(capacity)} (turn on model.gradient_checkpointing, or lower "
                          f"sampling.max_completion_length)")


class OutOfMemory(MemoryPlanError):
    """The device ran out of memory during a run; the message says where and what to change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA OOM, Python's MemoryError, or the CPU allocator's "not enough memory" RuntimeError."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text
                                              or "out of memory" in text.lower())


def out_of_memory(exc: BaseException, phase: str, cfg, predicted: MemoryPlan, step: int, last_saved: int) -> OutOfMemory:
    """The one-line-first message for an OOM in `phase` of `step` (the last checkpoint is intact)."""
    t, s = cfg.train, cfg.sampling
    sizes = (f"prompts_per_step={t.prompts_per_step} x num_generations={s.num_generations}, max_completion_length="
             f"{s.max_completion_length}, micro_batch_size={t.micro_batch_size or 'whole step'}"
             + (f", micro_batch_tokens={t.micro_batch_tokens}" if t.micro_batch_tokens else ""))
    advice = {"sampling": "lower sampling.kv_budget (the sampler then preempts) or prompts_per_step",
              "training": "set train.micro_batch_tokens: auto, turn on model.gradient_checkpointing, or lower "
                          "train.micro_batch_size"}.get(phase, "lower the batch sizes")
    checkpoint = f"checkpoint-{last_saved} is intact" if last_saved else "no checkpoint was written yet"
    return OutOfMemory(f"memory: out of memory while {phase} at step {step} ({type(exc).__name__}); the plan "
                       f"predicted {_fmt(predicted.phases.get(phase, predicted.peak_bytes))} for that phase with "
                       f"{sizes}. To fit: {advice} (`grpo-fast plan --device-memory ...` shows what fits); "
                       f"{checkpoint}.")
