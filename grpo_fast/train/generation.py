"""The one place the trainer meets a generation engine.

`Generator.generate(prompt_ids, n=..., ...) -> list[GroupOutput]` runs our paged group sampler
(`grpo_fast.sampler.Sampler`) when it supports the model, and HF `generate` otherwise (or when
asked with backend="hf"). Both return the same structure: per prompt `.completions`, G of them,
each with `.token_ids` (EOS / stop token included), `.logprobs` (log softmax(logits / T) of each
sampled token, before top-k/top-p filtering) and `.finish_reason` ("eos" | "stop" | "length").
"""

from __future__ import annotations

import logging

import torch

from grpo_fast.errors import ConfigError
from grpo_fast.sampler import Completion, GroupOutput, Sampler, SamplingParams
from grpo_fast.sampler.sampler import eos_token_ids

log = logging.getLogger(__name__)


class Generator:
    def __init__(self, model, tokenizer, *, backend: str = "auto", kv_budget=None, release_kv: bool = True):
        """release_kv: free the sampler's KV cache after each call (a trainer's sampling and
        training phases alternate, so the training pass gets that memory)."""
        self.model = model
        self.release_kv = release_kv
        self.tokenizer = tokenizer
        self.backend = "hf"
        self.sampler = None
        self.last_stats: dict = {}
        self.requested = backend
        self._notices: list[str] = []
        if backend in ("auto", "sampler"):
            try:
                self.sampler = Sampler(model, tokenizer, kv_budget=kv_budget)
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
                 seed: int | None = None) -> list[GroupOutput]:
        """n completions per prompt; temperature 0 = greedy."""
        if self.sampler is not None:
            params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                    max_tokens=max_tokens, stop=tuple(stop or ()), seed=seed)
            try:
                out = self.sampler.generate(prompt_ids, params)
            except Exception as exc:
                if self.requested == "sampler":
                    raise
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
        return hf_generate(self.model, self.tokenizer, prompt_ids, n=n, temperature=temperature,
                           max_tokens=max_tokens, top_p=top_p, top_k=top_k, min_p=min_p, stop=stop, seed=seed)


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, stop: list[str] | None = None,
                seed: int | None = None) -> list[GroupOutput]:
    """HF `generate` fallback with the Sampler's output contract. Prompts are left-padded and
    each repeated n times; the logged log-prob is log softmax(raw logits / T) (plain log softmax
    when greedy)."""
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
    kwargs = dict(max_new_tokens=max_tokens, do_sample=not greedy,
                  return_dict_in_generate=True, output_logits=True, pad_token_id=pad)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None, min_p=min_p or None)
    else:  # silence "temperature is set but do_sample=False" from a model's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
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
