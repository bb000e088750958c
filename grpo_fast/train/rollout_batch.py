"""What one GRPO step trains on: the (prompt, completion) sequences of B groups × G, laid out for
the training forward, and the rollout that carries them with their rewards and advantages.

A batch is laid out as [left-padded prompt | right-padded completion], width P + C, so the hidden
state at position P - 1 + t predicts completion token t for every row:

    input_ids      [N, P + C]
    targets, mask  [N, C]      completion tokens, 1 on real completion tokens

A multi-turn completion is segments of model and environment tokens: the environment's (tool
results, the next assistant header) stay in input_ids, so later model tokens attend to them, but
carry mask 0, so they are out of the loss, the entropy, the KL and every normalizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    position_ids: torch.Tensor  # [N, P + C]
    targets: torch.Tensor  # [N, C]
    mask: torch.Tensor  # [N, C] float {0, 1}; 0 on padding (and on truncated rows if masked)
    prompt_width: int  # P

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> SequenceBatch:
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                             self.targets[rows], self.mask[rows], self.prompt_width)

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                             self.targets.to(device), self.mask.to(device), self.prompt_width)


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
               keep: list[bool] | None = None, model_masks: list[list[int] | None] | None = None) -> SequenceBatch:
    """Pack N (prompt, completion) pairs. keep[i] = False zeroes row i's loss mask
    (mask_truncated_completions). model_masks[i] (multi-turn): 1 on the tokens the model sampled,
    0 on the environment's; None = all sampled."""
    n = len(prompts)
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + C), dtype=torch.long)
    mask = torch.zeros((n, C), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            if keep is None or keep[i]:
                sampled = None if model_masks is None else model_masks[i]
                if sampled is None:
                    mask[i, :len(c)] = 1.0
                else:
                    if len(sampled) != len(c):
                        raise ValueError(f"model_masks[{i}] has {len(sampled)} entries for {len(c)} completion tokens")
                    mask[i, :len(c)] = torch.tensor(sampled, dtype=torch.float32)
    # Positions count real tokens only, so a left-padded prompt sees the positions it was sampled at.
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return SequenceBatch(ids, attn, pos, ids[:, P:].clone(), mask, P)


@dataclass
class Rollout:
    """One step's experience, N = B × G rows (G consecutive rows per prompt)."""

    batch: SequenceBatch  # [N, P + C] sequences, [N, C] targets / mask
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N, F] per function, NaN = abstain
    total_reward: torch.Tensor  # [N] weighted sum
    prompts: list[str]  # [N]
    texts: list[str]  # [N] decoded completions
    finish_reasons: list[str]  # [N]
    stats: dict = field(default_factory=dict)
    sampling_logprobs: torch.Tensor | None = None  # [N, C] fp32: the sampler's log-prob of each token, 0 past the end
