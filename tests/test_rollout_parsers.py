"""Tool-call parsers per model family (grpo_fast/rollout/parsers.py)."""

import pytest

from grpo_fast.rollout import (FunctionParser, HermesParser, Llama3Parser, MistralParser, ParsedTurn, ToolCall,
                               get_parser)

ADD = ToolCall("add", {"a": 2, "b": 3})
MUL = ToolCall("mul", {"x": 4})


# -- Hermes / Qwen -----------------------------------------------------------------------------

def test_hermes_single_and_several_calls():
    p = HermesParser()
    assert p.stop_strings == ("</tool_call>",)
    t = p.parse('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    assert t == ParsedTurn("Let me add.", [ADD], None)
    t = p.parse('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
                '<tool_call>\n{"name": "mul", "arguments": "{\\"x\\": 4}"}\n</tool_call><|im_end|>')
    assert t.tool_calls == [ADD, MUL] and t.content == "" and t.error is None


def test_hermes_no_call_unclosed_and_malformed():
    p = HermesParser()
    assert p.parse("The answer is 5.<|im_end|>") == ParsedTurn("The answer is 5.", [], None)
    # the text ends inside the block (e.g. cut by the length budget after a complete JSON)
    assert p.parse('<tool_call>\n{"name": "mul", "arguments": {"x": 4}}').tool_calls == [MUL]
    bad = p.parse('<tool_call>\n{"name": "add", "arguments": {"a": 2,}\n</tool_call>')
    assert bad.tool_calls == [] and bad.error.startswith("tool call 1: not valid JSON")
    noname = p.parse('<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "mul", "arguments": {"x": 4}}'
                     '</tool_call>')
    assert noname.tool_calls == [MUL] and "tool call 1" in noname.error and "'name'" in noname.error
    listargs = p.parse('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>')
    assert listargs.tool_calls == [] and "must be a JSON object" in listargs.error


# -- Llama 3 -----------------------------------------------------------------------------------

def test_llama3_json_calls():
    p = Llama3Parser()
    assert p.stop_strings == ()
    assert p.parse('{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>') == ParsedTurn("", [ADD], None)
    t = p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "mul", "parameters": '
                '{"x": 4}}<|eom_id|>')
    assert t.tool_calls == [ADD, MUL] and t.error is None


def test_llama3_prose_and_malformed():
    p = Llama3Parser()
    assert p.parse("It is 5.<|eot_id|>") == ParsedTurn("It is 5.", [], None)
    assert p.parse('{"answer": 5}').tool_calls == []  # JSON but not a call: prose
    bad = p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 2')
    assert bad.tool_calls == [] and "not valid JSON" in bad.error
    noname = p.parse('<|python_tag|>{"parameters": {}}')
    assert noname.tool_calls == [] and "'name'" in noname.error


# -- Mistral -----------------------------------------------------------------------------------

def test_mistral_calls():
    p = MistralParser()
    assert p.stop_strings == ()
    t = p.parse('[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "mul", "arguments": '
                '{"x": 4}}]</s>')
    assert t == ParsedTurn("", [ADD, MUL], None)
    assert p.parse('[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}[TOOL_CALLS]mul[ARGS]{"x": 4}').tool_calls == [ADD, MUL]


def test_mistral_prose_and_malformed():
    p = MistralParser()
    assert p.parse("Five.</s>") == ParsedTurn("Five.", [], None)
    bad = p.parse('Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 2}')
    assert bad.content == "Sure." and bad.tool_calls == [] and "not valid JSON" in bad.error


# -- resolution --------------------------------------------------------------------------------

class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_get_parser_by_name_template_and_errors():
    assert isinstance(get_parser("qwen"), HermesParser) and isinstance(get_parser("Llama3"), Llama3Parser)
    assert isinstance(get_parser("mistral"), MistralParser)
    assert isinstance(get_parser(None), HermesParser)
    assert isinstance(get_parser(None, _Tok("{{ '[TOOL_CALLS]' }}")), MistralParser)
    assert isinstance(get_parser(None, _Tok("<|start_header_id|>{{ m }}<|eot_id|>")), Llama3Parser)
    assert isinstance(get_parser(None, _Tok("<|im_start|>{{ m }}")), HermesParser)
    with pytest.raises(ValueError, match=r"unknown tool-call parser 'gpt'.*hermes.*llama3.*mistral"):
        get_parser("gpt")
    with pytest.raises(ValueError, match="tool-call parser must be"):
        get_parser(42)


def test_user_parsers():
    def fn(text):
        return [{"name": "add", "arguments": {"a": 2, "b": 3}}] if "add" in text else []

    p = get_parser(fn)
    assert isinstance(p, FunctionParser) and p.parse("add please").tool_calls == [ADD]
    assert p.parse("nothing") == ParsedTurn("nothing", [], None)

    def crashes(text):
        raise KeyError("oops")

    assert get_parser(crashes).parse("x").error == "KeyError: 'oops'"

    class Mine:
        stop_strings = ("<end>",)

        def parse(self, text):
            return ParsedTurn(text, [MUL])

    mine = Mine()
    assert get_parser(mine) is mine and get_parser(Mine).stop_strings == ("<end>",)

    class NoStops:
        def parse(self, text):
            return ParsedTurn("", [ADD])

    wrapped = get_parser(NoStops())
    assert wrapped.stop_strings == () and wrapped.parse("x").tool_calls == [ADD]
