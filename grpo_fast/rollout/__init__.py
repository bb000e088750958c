"""Multi-turn rollouts: tools, tool-call parsers, the tool executor, environments and the
chat-template rendering of turns as token deltas; agent_loop.py drives them from the sampler's
turn handler (ToolSetup per run, ToolRollout per generate call)."""

from .agent_loop import ToolRollout, ToolSetup, Trajectory, tool_metrics
from .environments import EnvironmentInstance, EnvironmentSpec, append_to_last_user, tools_by_name
from .executor import ToolExecutor, parse_error_result
from .parsers import (PARSERS, FunctionParser, HermesParser, Llama3Parser, MistralParser, ParsedTurn,
                      detect_parser_name, get_parser)
from .render import (default_tool_system_text, observation_text, observation_tokens, render_prompt,
                     render_prompt_text, template_ignores_tools, tool_messages)
from .tools import STATUSES, ToolCall, ToolResult, stringify, tool_name, tool_schema

__all__ = [
    "ToolRollout", "ToolSetup", "Trajectory", "tool_metrics",
    "EnvironmentInstance", "EnvironmentSpec", "append_to_last_user", "tools_by_name",
    "ToolExecutor", "parse_error_result",
    "PARSERS", "FunctionParser", "HermesParser", "Llama3Parser", "MistralParser", "ParsedTurn",
    "detect_parser_name", "get_parser",
    "default_tool_system_text", "observation_text", "observation_tokens", "render_prompt",
    "render_prompt_text", "template_ignores_tools", "tool_messages",
    "STATUSES", "ToolCall", "ToolResult", "stringify", "tool_name", "tool_schema",
]
