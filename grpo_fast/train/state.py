"""What a run has done so far (typed, not a string-keyed dict): saved in every checkpoint as
trainer_state.json, read by callbacks, and passed to reward functions as `trainer_state` (TRL's
`global_step`, `max_steps`, `epoch` are there under the same names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps finished (a step = one rollout, num_iterations updates)
    max_steps: int = 0
    epoch: float = 0.0  # passes over the training prompts so far
    eval_before: dict | None = None  # eval metrics before training (None: not measured yet)
    history: list[dict] = field(default_factory=list)  # per step: reward, kl
    skipped_prompts: int = 0  # over max_prompt_length, dropped (data.on_long_prompt=skip)
    num_tokens: int = 0  # prompt + completion tokens trained on so far (TRL's num_tokens)
    loss_state: dict = field(default_factory=dict)  # the loss's state across steps (grpo_fast.train.update)
    should_stop: bool = False  # a callback sets it to end the run after the current step (not saved)

    @property
    def is_world_process_zero(self) -> bool:
        """TRL's name: True on rank 0 (the one that writes files) and in a one-process run; a
        callback that writes should check it, as callbacks run on every rank."""
        from grpo_fast import distributed

        return distributed.is_main()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("should_stop")
        out["step"] = out.pop("global_step")  # the checkpoint's key since the first release
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        data = dict(data)
        data["global_step"] = data.pop("step", data.get("global_step", 0))
        eval_before = data.get("eval_before")
        if isinstance(eval_before, (int, float)):  # checkpoints before eval metrics: accuracy only
            data["eval_before"] = {"eval/accuracy": float(eval_before)}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
