"""The adapter folder's model card (README.md): a YAML header the Hugging Face Hub reads, then what
the adapter is, what it was trained on and with, its final metrics, and how to load it.

peft's save_pretrained writes a placeholder README.md; write_model_card replaces it, so call it
after the adapter is saved.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml

# (label, keys to look up: a dotted "section.field" of our nested config or a flat TRL-style name)
KEY_HYPERPARAMETERS = (
    ("loss type", ("loss.loss_type", "loss_type")),
    ("importance sampling level", ("loss.importance_sampling_level", "importance_sampling_level")),
    ("learning rate", ("train.learning_rate", "learning_rate")),
    ("LR schedule", ("train.lr_scheduler_type", "lr_scheduler_type")),
    ("steps", ("train.max_steps", "max_steps")),
    ("prompts per step (B)", ("train.prompts_per_step", "prompts_per_step")),
    ("completions per prompt (G)", ("sampling.num_generations", "num_generations")),
    ("policy updates per batch (μ)", ("loss.num_iterations", "num_iterations")),
    ("KL coefficient (β)", ("loss.beta", "beta")),
    ("clip ε (low / high)", ("loss.epsilon", "epsilon")),
    ("reward scaling", ("loss.scale_rewards", "scale_rewards")),
    ("temperature", ("sampling.temperature", "temperature")),
    ("max completion length", ("sampling.max_completion_length", "max_completion_length")),
    ("LoRA r", ("lora.r", "lora_r")),
    ("LoRA alpha", ("lora.lora_alpha", "lora_alpha")),
    ("LoRA dropout", ("lora.lora_dropout", "lora_dropout")),
    ("4-bit base (QLoRA)", ("model.load_in_4bit", "load_in_4bit")),
    ("seed", ("train.seed", "seed")),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gguf", ".txt", ".arrow", ".yaml", ".yml")


def write_model_card(folder: str | Path, *, base_model: str, dataset: str, reward_funcs: list,
                     config: dict, metrics: dict | None = None, library: str = "grpo-fast",
                     repo_id: str | None = None) -> Path:
    """Write folder/README.md and return its path.

    base_model: a Hub id (goes into the header) or a local path (named in the text only).
    dataset: a Hub dataset id, a file, or a description such as "arithmetic (built-in task)".
    reward_funcs: names (or callables, named by __name__). config: the run's config, nested by
    section (Config.to_dict()) or flat with TRL's names. metrics: `before/<name>` and
    `after/<name>` are eval metrics before and after training, shown side by side (`eval_before` /
    `eval_after` = the accuracy, as fractions); any other key is a final training metric.
    repo_id: where the adapter will live on the Hub (the load snippet uses it; else the folder's path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"write_model_card: {str(folder)!r} is not a folder")
    text = render_model_card(base_model=base_model, dataset=dataset, reward_funcs=reward_funcs, config=config,
                             metrics=metrics, library=library, repo_id=repo_id, folder=folder)
    fd, tmp = tempfile.mkstemp(prefix=".README-", suffix=".md", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets, not a README
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"


def render_model_card(*, base_model: str, dataset: str, reward_funcs: list, config: dict,
                      metrics: dict | None, library: str = "grpo-fast", repo_id: str | None = None,
                      folder: str | Path = "adapter") -> str:
    """The card's text (write_model_card's arguments; folder is only named in the load snippet)."""
    config = _plain(config or {})
    flat = _flatten(config)
    where = repo_id or str(folder)
    title = repo_id.split("/")[-1] if repo_id else f"{Path(base_model).name} GRPO LoRA adapter"
    rewards = [getattr(f, "__name__", None) or str(f) for f in reward_funcs]
    header = {"library_name": "peft", "pipeline_tag": "text-generation",
              "tags": ["grpo", library, "lora", "peft", "transformers"]}
    if is_hub_id(base_model):
        header["base_model"] = base_model
    if is_hub_id(dataset):
        header["datasets"] = [dataset]
    header = {k: header[k] for k in ("base_model", "library_name", "pipeline_tag", "datasets", "tags") if k in header}

    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {title}", "",
              f"A LoRA adapter for {_link(base_model, 'model')}, fine-tuned with GRPO (Group Relative Policy "
              f"Optimization) by {library}: for each prompt the model samples a group of completions, reward "
              f"functions score them, and each completion is reinforced by how much better it did than its "
              f"group's average.", ""]
    lines += ["## Base model", "", f"{_link(base_model, 'model')}. The adapter holds only the LoRA weights; "
              "load it on top of this model (below).", ""]
    lines += ["## Training data", "", f"{_link(dataset, 'dataset')}.", ""]
    lines += ["## Reward functions", ""] + _rewards(rewards, flat) + [""]
    lines += ["## Training configuration", "", "| hyperparameter | value |", "|---|---|"]
    for label, keys in KEY_HYPERPARAMETERS:
        value = _lookup(flat, keys)
        if label.startswith("clip"):
            high = _lookup(flat, ("loss.epsilon_high", "epsilon_high"))
            value = None if value is None else f"{_fmt(value)} / {_fmt(high if high is not None else value)}"
        if value is not None:
            lines.append(f"| {label} | {_fmt(value)} |")
    if config:
        lines += ["", "<details><summary>Full configuration</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```", "", "</details>"]
    lines += [""] + _results(metrics or {})
    merged = "<run folder>/merged" if repo_id else str(Path(folder).parent / "merged")
    lines += _usage(base_model, where, merged)
    lines += ["## Credits", "",
              f"Trained with {library} (a GRPO fine-tuning engine: fused GRPO loss kernels, a paged KV-cache group "
              f"sampler, QLoRA), on top of PyTorch, Hugging Face transformers and peft.", ""]
    return "\n".join(lines)


def is_hub_id(name: str | None) -> bool:
    """'owner/name' that is not a local path or a data file: the Hub links it in the header."""
    if not name or not _HUB_ID.match(name) or name.lower().endswith(_FILE_SUFFIXES):
        return False
    return not Path(name).exists()


def _link(name: str, kind: str) -> str:
    if is_hub_id(name):
        url = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{name}"
        return f"[{name}]({url})"
    return f"`{name}`"


def _rewards(names: list[str], flat: dict) -> list[str]:
    weights = _lookup(flat, ("rewards.weights", "reward_weights"))
    if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
        weights = [1.0] * len(names)
    out = [f"- `{n}` (weight {_fmt(w)})" for n, w in zip(names, weights)]
    if len(names) > 1:
        out += ["", "A completion's reward is the weighted sum; advantages are taken within each group."]
    return out or ["(none recorded)"]


def _results(metrics: dict) -> list[str]:
    evals: dict[str, list] = {}  # eval metric -> [before, after]
    rest = {}
    for k, v in metrics.items():
        if v is None:
            continue
        if k in ("eval_before", "eval_after"):
            evals.setdefault("eval/accuracy", [None, None])[k == "eval_after"] = v
        elif k.startswith(("before/", "after/")):
            when, name = k.split("/", 1)
            evals.setdefault(name, [None, None])[when == "after"] = v
        else:
            rest[k] = v
    if not evals and not rest:
        return []
    out = ["## Results", ""]
    accuracy = evals.get("eval/accuracy") or evals.get("accuracy")
    if accuracy:
        b, a = (_pct(x) for x in accuracy)
        out += [f"Eval accuracy on the held-out split: **{b} before training -> {a} after**.", ""]
    if evals:
        out += ["| eval metric | before training | after training |", "|---|---|---|"]
        for name, (b, a) in evals.items():
            show = _pct if "accuracy" in name or "pass@" in name else _fmt
            out.append(f"| {name} | {show(b)} | {show(a)} |")
        out.append("")
    if rest:
        out += ["| final training metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rest.items()]
        out.append("")
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _usage(base_model: str, where: str, merged: str) -> list[str]:
    q = json.dumps  # a Python string literal for any path or id
    return [
        "## How to use", "",
        "With peft, on top of the base model:", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"base = AutoModelForCausalLM.from_pretrained({q(base_model)})",
        f"model = PeftModel.from_pretrained(base, {q(where)})",
        f"tokenizer = AutoTokenizer.from_pretrained({q(where)})",
        "```", "",
        "As a merged model: `grpo-fast train ... --merge` also writes `merged/` next to `adapter/` in the run "
        "folder, the base weights with this adapter folded in, which plain transformers (or vLLM) loads:", "",
        "```python",
        "from transformers import AutoModelForCausalLM", "",
        f"model = AutoModelForCausalLM.from_pretrained({q(merged)})",
        "```", "",
        "(or fold it in yourself: `model.merge_and_unload().save_pretrained(...)`).", "",
    ]


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix:  # one level of sections, as Config.to_dict()
            out.update(_flatten(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def _plain(v):
    """Only YAML's plain types (a Path or a tuple in a config would break safe_dump)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _lookup(flat: dict, keys: tuple[str, ...]):
    for k in keys:
        if flat.get(k) is not None:
            return flat[k]
    return None


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|")
