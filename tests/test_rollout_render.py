"""Chat-template rendering of turns as token deltas (grpo_fast/rollout/render.py).

The check that matters: prompt tokens + the model's tokens + observation tokens must equal the
tokenization of the whole conversation rendered by the template, so the sampler, which only
appends, holds exactly the sequence the template defines.
"""

import json
import os
import string

import pytest

from grpo_fast.rollout import (ToolCall, ToolResult, default_tool_system_text, observation_text, observation_tokens,
                               render_prompt, render_prompt_text, template_ignores_tools, tool_schema)
from grpo_fast.rollout.render import encode

# SmolLM2-135M-Instruct's template, verbatim: plain ChatML, ignores `tools`.
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# A compact template with Qwen2.5's tool handling: tools listed in the system turn, assistant
# tool_calls as <tool_call> blocks, consecutive "tool" messages grouped in one user turn of
# <tool_response> blocks.
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- '\n\n# Tools\n<tools>' }}{%- for t in tools %}{{- '\n' }}{{- t | tojson }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\n' + m.content }}{%- endif %}"
    "{%- for c in m.tool_calls %}{{- '\n<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
    "{{- c.function.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# A strict Mistral-like template: a tool message must follow an assistant message with
# tool_calls (with 9-character ids), and such an assistant message is rendered as its calls.
STRICT = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}</s>"
    "{%- elif m.role == 'assistant' %}{{ m.content }}</s>"
    "{%- elif m.role == 'tool' %}"
    "{%- set prev = messages[loop.index0 - 1] %}"
    "{%- if not prev.tool_calls and prev.role != 'tool' %}"
    "{{ raise_exception('tool message without a preceding tool call') }}{% endif %}"
    "{%- if m.tool_call_id | length != 9 %}{{ raise_exception('bad id') }}{% endif %}"
    "[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}")


def char_tokenizer(template):
    """One token per printable character, plus ChatML / Mistral special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [c for c in string.printable if c not in "\x0b\x0c"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", additional_special_tokens=["</s>"])
    tok.chat_template = template
    return tok


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


SCHEMAS = [tool_schema(add)]
USER = [{"role": "user", "content": "What is 2+3?"}]
CALL = ToolCall("add", {"a": 2, "b": 3})
HERMES_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def full_ids(tok, messages, **kw):
    return encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw))


@pytest.fixture(scope="module")
def smol():
    return char_tokenizer(SMOL)


@pytest.fixture(scope="module")
def qwen():
    return char_tokenizer(QWEN)


def test_template_tool_support_detection(smol, qwen):
    assert template_ignores_tools(smol) and not template_ignores_tools(qwen)


def test_prompt_injects_tool_text_when_template_ignores_tools(smol, qwen):
    text = render_prompt_text(smol, USER, SCHEMAS)
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(SCHEMAS[0]) in text
    assert "<tool_call>" in text and "SmolLM" not in text  # our system message replaced the default one
    with_sys = render_prompt_text(smol, [{"role": "system", "content": "Be brief."}] + USER, SCHEMAS)
    assert with_sys.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert render_prompt_text(smol, USER) == smol.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    # a template that renders tools gets them as-is, nothing injected
    q = render_prompt_text(qwen, USER, SCHEMAS)
    assert q == qwen.apply_chat_template(USER, tools=SCHEMAS, tokenize=False, add_generation_prompt=True)
    assert "# Tools\n<tools>" in q and "You may call" not in q
    assert render_prompt(qwen, USER, SCHEMAS) == encode(qwen, q)


@pytest.mark.parametrize("ended", [False, True], ids=["stopped_at_tool_call", "ended_with_im_end"])
def test_smol_observation_extends_exactly(smol, ended):
    completion = HERMES_CALL + ("<|im_end|>" if ended else "")
    results = [ToolResult(CALL, "5")]
    seq = render_prompt(smol, USER, SCHEMAS) + encode(smol, completion) + \
        observation_tokens(smol, results, completion_text=completion)
    expected = full_ids(smol, [{"role": "system", "content": default_tool_system_text(SCHEMAS)}] + USER + [
        {"role": "assistant", "content": HERMES_CALL},
        {"role": "tool", "content": "<tool_response>\n5\n</tool_response>"}])
    assert seq == expected
    assert smol.decode(seq).endswith("</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>\n5\n"
                                     "</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("ended", [False, True], ids=["stopped_at_tool_call", "ended_with_im_end"])
def test_qwen_observation_extends_exactly_two_turns(qwen, ended):
    """Two tool rounds, the second with two results (grouped in one user turn) one an error."""
    end = "<|im_end|>" if ended else ""
    second = HERMES_CALL + "\n" + HERMES_CALL.replace('"b": 3', '"b": "x"')
    r1 = [ToolResult(CALL, "5")]
    r2 = [ToolResult(CALL, "5"), ToolResult(ToolCall("add", {"a": 2, "b": "x"}),
                                            "TypeError: unsupported operand", "error")]
    seq = render_prompt(qwen, USER, SCHEMAS)
    for completion, results in ((HERMES_CALL + end, r1), (second + end, r2)):
        seq += encode(qwen, completion) + observation_tokens(qwen, results, completion_text=completion)
    expected = full_ids(qwen, USER + [
        {"role": "assistant", "content": HERMES_CALL}, {"role": "tool", "content": "5"},
        {"role": "assistant", "content": second}, {"role": "tool", "content": "5"},
        {"role": "tool", "content": "TypeError: unsupported operand"}], tools=SCHEMAS)
    assert seq == expected
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nTypeError" in qwen.decode(seq)


def test_ended_turn_override(qwen):
    results = [ToolResult(CALL, "5")]
    stopped = observation_text(qwen, results, completion_text="x")
    assert stopped.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")
    assert observation_text(qwen, results, completion_text="x", ended_turn=True) == stopped[len("<|im_end|>"):]
    assert observation_text(qwen, results, completion_text="x<|im_end|>", ended_turn=False) == stopped


def test_parse_error_observation_renders(qwen):
    bad = ToolResult(None, "Error: could not parse the tool call: not valid JSON", "parse_error")
    text = observation_text(qwen, [bad], completion_text="<tool_call>{oops</tool_call>")
    assert "<tool_response>\nError: could not parse the tool call: not valid JSON\n</tool_response>" in text


def test_strict_template_needs_tool_calls(qwen):
    """A template that refuses tool messages after a plain assistant message: the delta is taken
    after an assistant turn rendered with tool_calls and ids."""
    tok = char_tokenizer(STRICT)
    completion = "[TOOL_CALLS]" + json.dumps([{"name": "add", "arguments": {"a": 2, "b": 3}}]) + "</s>"
    results = [ToolResult(CALL, "5")]
    assert not template_ignores_tools(tok)
    seq = render_prompt(tok, USER, SCHEMAS) + encode(tok, completion) + \
        observation_tokens(tok, results, completion_text=completion)
    expected = full_ids(tok, USER + [
        {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
                                              "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "5"}], tools=SCHEMAS)
    assert seq == expected
    assert observation_text(tok, results, completion_text="[TOOL_CALLS][]") == "</s>[TOOL_RESULTS]5[/TOOL_RESULTS]"


def test_unrenderable_template_is_a_clear_error():
    tok = char_tokenizer("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
                         "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="cannot render tool messages.*no tools here"):
        observation_tokens(tok, [ToolResult(CALL, "5")], completion_text="x")
    with pytest.raises(ValueError, match="at least one ToolResult"):
        observation_tokens(tok, [], completion_text="x")


SMOL_DIR = os.path.expanduser("~/.cache/grpo_fast/SmolLM2-135M-Instruct")


@pytest.mark.skipif(not os.path.exists(os.path.join(SMOL_DIR, "tokenizer.json")),
                    reason="the converted SmolLM2 folder is not cached on this machine")
@pytest.mark.parametrize("ended", [False, True])
def test_real_smollm2_tokenizer_extends_exactly(ended):
    """The default model's own BPE tokenizer and template: the deltas still line up exactly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_DIR)
    completion = "Let me compute.\n" + HERMES_CALL + ("<|im_end|>" if ended else "")
    seq = render_prompt(tok, USER, SCHEMAS) + encode(tok, completion) + \
        observation_tokens(tok, [ToolResult(CALL, "5")], completion_text=completion)
    expected = full_ids(tok, [{"role": "system", "content": default_tool_system_text(SCHEMAS)}] + USER + [
        {"role": "assistant", "content": "Let me compute.\n" + HERMES_CALL},
        {"role": "tool", "content": "<tool_response>\n5\n</tool_response>"}])
    assert seq == expected


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"]
LLAMA_CALL = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


@pytest.mark.parametrize("name,call,end", [
    ("qwen2_5", HERMES_CALL, "<|im_end|>"), ("qwen3", HERMES_CALL, "<|im_end|>"),
    ("llama3_1", LLAMA_CALL, "<|eot_id|>"), ("llama3_1", LLAMA_CALL, "<|eom_id|>"), ("llama3_1", LLAMA_CALL, "")])
def test_real_templates_shipped_with_trl(name, call, end):
    """The real Qwen2.5 / Qwen3 / Llama 3.1 templates (TRL ships copies; TRL is a bench extra, so
    this skips without it): the deltas line up with the full rendering."""
    trl = pytest.importorskip("trl")
    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", name + ".jinja")
    if not os.path.exists(path):
        pytest.skip(f"this TRL has no {name}.jinja")
    tok = char_tokenizer(open(path).read())
    if name.startswith("llama"):
        tok.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    completion = call + end
    seq = render_prompt(tok, USER, SCHEMAS) + encode(tok, completion) + \
        observation_tokens(tok, [ToolResult(CALL, "5")], completion_text=completion)
    full = USER + [{"role": "assistant", "content": call}, {"role": "tool", "name": "add", "content": "5"}]
    text = tok.decode(seq)
    if end == "<|eom_id|>":  # Llama ends a tool call with <|eom_id|>; the template would write <|eot_id|>
        assert "<|eom_id|><|start_header_id|>ipython" in text
        text = text.replace("<|eom_id|>", "<|eot_id|>")
    assert text == tok.apply_chat_template(full, tools=SCHEMAS, tokenize=False, add_generation_prompt=True)
    if end != "<|eom_id|>":
        assert seq == full_ids(tok, full, tools=SCHEMAS)
