"""The adapter's model card (README.md) and push_to_hub, through a local fake of HfApi: nothing here
touches the network."""

from __future__ import annotations

import json

import pytest
import yaml

from grpo_fast.errors import UserError
from grpo_fast.train.hub import HubError, push_to_hub
from grpo_fast.train.model_card import is_hub_id, write_model_card

CONFIG = {
    "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "load_in_4bit": False},
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": None},
    "sampling": {"num_generations": 8, "temperature": 1.0, "max_completion_length": 64},
    "loss": {"loss_type": "dapo", "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "num_iterations": 1},
    "train": {"max_steps": 40, "learning_rate": 2e-5, "prompts_per_step": 4, "seed": 0, "output_dir": "runs/x"},
    "rewards": {"funcs": ["accuracy", "format"], "weights": [1.0, 0.5]},
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real peft adapter folder (LoRA on a tiny random Llama), as the loop saves it."""
    from peft import LoraConfig, get_peft_model
    from test_train_loop import make_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_tiny_model(tmp_path_factory.mktemp("base"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("run") / "adapter"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_card_header_and_sections(adapter):
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    path = write_model_card(adapter, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="openai/gsm8k",
                            reward_funcs=["accuracy", "format"], config=CONFIG,
                            metrics={"eval_before": 0.24, "eval_after": 0.71, "reward": 0.8125, "kl": 0.0123})
    assert path == adapter / "README.md"  # replaces peft's placeholder card
    header, body = _split(path.read_text())
    assert header["library_name"] == "peft" and header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert header["datasets"] == ["openai/gsm8k"] and header["pipeline_tag"] == "text-generation"
    assert {"grpo", "grpo-fast", "lora"} <= set(header["tags"])

    for section in ("## Base model", "## Training data", "## Reward functions", "## Training configuration",
                    "## Results", "## How to use", "## Credits"):
        assert section in body
    assert "- `accuracy` (weight 1)" in body and "- `format` (weight 0.5)" in body
    for row in ("| loss type | dapo |", "| learning rate | 2e-05 |", "| steps | 40 |",
                "| completions per prompt (G) | 8 |", "| LoRA r | 16 |", "| LoRA alpha | 32 |",
                "| KL coefficient (β) | 0.04 |", "| clip ε (low / high) | 0.2 / 0.28 |"):
        assert row in body
    assert "**24.0% before training -> 71.0% after**" in body and "| kl | 0.0123 |" in body
    assert "| eval/accuracy | 24.0% | 71.0% |" in body
    assert f'PeftModel.from_pretrained(base, "{adapter}")' in body
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in body
    assert "--merge" in body and f'AutoModelForCausalLM.from_pretrained("{adapter.parent / "merged"}")' in body
    assert "citation" not in body.lower() and "bibtex" not in body.lower()
    # the full config is there too, as YAML that reads back to the same dict
    full = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(full) == CONFIG


def test_card_snippet_loads_the_adapter(adapter):
    """The load snippet is code that runs: with the folder as the repo it loads our adapter."""
    from test_train_loop import make_tiny_model

    base = make_tiny_model(adapter.parent / "base-for-snippet")
    write_model_card(adapter, base_model=str(base), dataset="arithmetic (built-in task)",
                     reward_funcs=["accuracy"], config=CONFIG, metrics=None)
    header, body = _split((adapter / "README.md").read_text())
    assert "base_model" not in header and "datasets" not in header  # local names: in the text only
    assert f"`{base}`" in body and "`arithmetic (built-in task)`" in body and "## Results" not in body
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet, scope)
    from peft import PeftModel

    assert isinstance(scope["model"], PeftModel) and scope["model"].peft_config["default"].r == 4
    assert scope["tokenizer"]("1 + 2").input_ids  # the adapter folder carries the tokenizer


def test_card_takes_flat_trl_config_and_callables(tmp_path):
    def my_reward(prompts, completions, **kw):
        return [0.0] * len(prompts)

    flat = {"learning_rate": 1e-6, "max_steps": 10, "num_generations": 4, "loss_type": "grpo", "beta": 0.0,
            "lora_r": 8, "output_dir": tmp_path}
    write_model_card(tmp_path, base_model="Qwen/Qwen3-0.6B", dataset="data/train.jsonl", reward_funcs=[my_reward],
                     config=flat, metrics={"eval_after": 0.5}, repo_id="me/qwen3-grpo")
    header, body = _split((tmp_path / "README.md").read_text())
    assert "datasets" not in header and body.startswith("\n# qwen3-grpo")
    assert "- `my_reward` (weight 1)" in body and "| loss type | grpo |" in body and "| LoRA r | 8 |" in body
    assert "**n/a before training -> 50.0% after**" in body
    assert 'PeftModel.from_pretrained(base, "me/qwen3-grpo")' in body


def test_card_shows_eval_metrics_before_and_after(tmp_path):
    metrics = {"before/eval/accuracy": 0.25, "after/eval/accuracy": 0.5, "before/eval/pass@4": 0.5,
               "after/eval/pass@4": 0.75, "after/eval/rewards/format/mean": 0.875, "reward": 0.625}
    write_model_card(tmp_path, base_model="Qwen/Qwen3-0.6B", dataset="openai/gsm8k", reward_funcs=["accuracy"],
                     config={}, metrics=metrics)
    body = (tmp_path / "README.md").read_text()
    assert "**25.0% before training -> 50.0% after**" in body
    for row in ("| eval/accuracy | 25.0% | 50.0% |", "| eval/pass@4 | 50.0% | 75.0% |",
                "| eval/rewards/format/mean | n/a | 0.875 |", "| reward | 0.625 |"):
        assert row in body


def test_is_hub_id(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("openai/gsm8k")
    for name in ("arithmetic", "data/train.jsonl", "/abs/path", "a/b/c", "model.gguf", "", None):
        assert not is_hub_id(name)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_hub_id(str(tmp_path / "owner" / "name"))


# ---------------------------------------------------------------- push_to_hub through a fake HfApi


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None, **kw):
            calls.append(("init", {"token": token, **kw}))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return calls


def test_push_to_hub_creates_the_repo_then_uploads_the_folder(adapter, fake_hub):
    write_model_card(adapter, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="openai/gsm8k",
                     reward_funcs=["accuracy"], config=CONFIG, metrics=None, repo_id="me/tiny-grpo")
    url = push_to_hub(adapter, "me/tiny-grpo", token="hf_fake", private=True, commit_message="first")
    assert url == "https://huggingface.co/me/tiny-grpo"
    assert [name for name, _ in fake_hub] == ["init", "create_repo", "upload_folder"]
    assert fake_hub[0][1]["token"] == "hf_fake"
    assert fake_hub[1][1] == {"repo_id": "me/tiny-grpo", "private": True, "repo_type": "model", "exist_ok": True}
    upload = fake_hub[2][1]
    assert upload["repo_id"] == "me/tiny-grpo" and upload["folder_path"] == str(adapter)
    assert upload["commit_message"] == "first" and upload["repo_type"] == "model"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}


def test_push_to_hub_uses_the_saved_login(adapter, fake_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    push_to_hub(adapter, "me/tiny-grpo")
    assert fake_hub[0][1]["token"] == "hf_saved" and fake_hub[1][1]["private"] is None


def test_push_to_hub_errors_are_one_line_naming_the_repo(adapter, fake_hub, monkeypatch, tmp_path):
    import huggingface_hub

    with pytest.raises(HubError, match=r"^push_to_hub: no Hugging Face token to upload to 'me/x': run `hf auth login`"):
        push_to_hub(adapter, "me/x")
    with pytest.raises(HubError, match=r"is not a folder, nothing to upload to 'me/x'"):
        push_to_hub(tmp_path / "missing", "me/x", token="hf_fake")

    def offline(self, **kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(a long traceback-ish tail)")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    with pytest.raises(HubError) as err:
        push_to_hub(adapter, "me/x", token="hf_fake")
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert str(err.value) == (f"push_to_hub: uploading {str(adapter)!r} to 'me/x' failed "
                              f"(ConnectionError: Failed to resolve 'huggingface.co')")
    assert err.value.__cause__ is None and err.value.__suppress_context__
