"""Tool schemas and the tool executor (grpo_fast/rollout/tools.py, executor.py)."""

import asyncio
import threading
import time

import pytest

from grpo_fast.rollout import ToolCall, ToolExecutor, ToolResult, stringify, tool_schema


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


async def echo(text: str) -> str:
    """Echo the text back.

    Args:
        text: What to echo.
    """
    await asyncio.sleep(0)
    return text.upper()


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise ValueError(f"bad x={x}")


def nap(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


async def slow_async(seconds: float) -> str:
    """Sleep asynchronously.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(seconds)
    return "late"


def as_dict(n: int) -> dict:
    """A structured answer.

    Args:
        n: A number.
    """
    return {"n": n, "squares": [n * n]}


class Counter:
    def bump(self, by: int) -> int:
        """Increase the counter.

        Args:
            by: The increment.
        """
        return by


# -- schemas -----------------------------------------------------------------------------------

def test_schema_from_signature_and_docstring():
    s = tool_schema(add)
    assert s["type"] == "function"
    f = s["function"]
    assert f["name"] == "add" and f["description"] == "Add two integers."
    assert f["parameters"]["properties"] == {"a": {"type": "integer", "description": "The first number."},
                                             "b": {"type": "integer", "description": "The second number."}}
    assert f["parameters"]["required"] == ["a"]  # b has a default


def test_schema_async_and_bound_method():
    assert tool_schema(echo)["function"]["parameters"]["properties"]["text"]["type"] == "string"
    m = tool_schema(Counter().bump)["function"]
    assert m["name"] == "bump" and list(m["parameters"]["properties"]) == ["by"]  # no self


def test_schema_errors_name_the_function_and_problem():
    def no_doc(x: int):
        return x

    def no_arg_doc(x: int):
        """Does things."""

    def no_hint(x):
        """Does things.

        Args:
            x: A thing.
        """

    def star(x: int, **kw):
        """Does things.

        Args:
            x: A thing.
        """

    with pytest.raises(ValueError, match=r"no_doc has no docstring"):
        tool_schema(no_doc)
    with pytest.raises(ValueError, match=r"no_arg_doc.*docstring.*'x'"):
        tool_schema(no_arg_doc)
    with pytest.raises(ValueError, match=r"no_hint.*type hint.*x"):
        tool_schema(no_hint)
    with pytest.raises(ValueError, match=r"star.*\*\*kwargs.*kw"):
        tool_schema(star)


def test_stringify_and_result_validation():
    assert stringify({"a": [1, "é"]}) == '{"a": [1, "é"]}'
    assert stringify([1, 2]) == "[1, 2]" and stringify(3.5) == "3.5" and stringify(None) == "None"
    with pytest.raises(ValueError, match="status"):
        ToolResult(None, "x", "weird")


# -- executor ----------------------------------------------------------------------------------

@pytest.fixture
def ex():
    e = ToolExecutor({"add": add, "echo": echo, "boom": boom, "nap": nap, "slow_async": slow_async,
                      "as_dict": as_dict}, timeout=0.2, max_workers=4)
    yield e
    e.shutdown()


def test_ok_async_and_structured_results_in_order(ex):
    res = ex.submit([ToolCall("add", {"a": 2, "b": 3}), ToolCall("echo", {"text": "hi"}),
                     ToolCall("as_dict", {"n": 3})]).result(timeout=5)
    assert [(r.status, r.content) for r in res] == [("ok", "5"), ("ok", "HI"), ("ok", '{"n": 3, "squares": [9]}')]
    assert res[0].call == ToolCall("add", {"a": 2, "b": 3})
    m = ex.metrics()
    assert m["calls"] == 3 and m["errors"] == 0 and m["timeouts"] == 0


def test_raising_tool_is_an_error_observation(ex):
    (r,) = ex.run([ToolCall("boom", {"x": 7})])
    assert r.status == "error" and r.content == "ValueError: bad x=7"
    assert ex.metrics()["errors"] == 1


def test_unknown_tool_and_bad_arguments(ex):
    unknown, missing, extra, not_obj = ex.run([
        ToolCall("nope", {}), ToolCall("add", {"b": 1}), ToolCall("add", {"a": 1, "zzz": 2}),
        ToolCall("add", ["a"])])  # type: ignore[arg-type]
    assert unknown.status == "unknown_tool" and "'nope'" in unknown.content and "add" in unknown.content
    assert missing.status == "error" and missing.content.startswith("TypeError: add(): ") and "'a'" in missing.content
    assert extra.status == "error" and "zzz" in extra.content
    assert not_obj.status == "error" and "JSON object" in not_obj.content
    m = ex.metrics()
    assert m["calls"] == 4 and m["errors"] == 4 and m["unknown_tools"] == 1


def test_blocking_timeout_resolves_future(ex):
    t0 = time.perf_counter()
    (r, ok) = ex.submit([ToolCall("nap", {"seconds": 1.0}), ToolCall("add", {"a": 1})]).result(timeout=5)
    assert time.perf_counter() - t0 < 0.9  # did not wait for the 1 s nap
    assert r.status == "timeout" and "'nap' timed out after 0.2 s" in r.content
    assert ok.status == "ok"
    assert ex.metrics()["timeouts"] == 1


def test_async_timeout_cancels(ex):
    (r,) = ex.run([ToolCall("slow_async", {"seconds": 5.0})])
    assert r.status == "timeout"


def test_blocking_tools_run_concurrently():
    with ToolExecutor({"nap": nap}, timeout=5.0, max_workers=2) as ex:
        t0 = time.perf_counter()
        a = ex.submit([ToolCall("nap", {"seconds": 0.3})])
        b = ex.submit([ToolCall("nap", {"seconds": 0.3})])
        assert not a.done()  # submit returned before the tool finished
        assert a.result(timeout=5)[0].content == b.result(timeout=5)[0].content == "awake"
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.55, f"two 0.3 s tools took {elapsed:.2f} s: not concurrent"


def test_submit_does_not_block_caller_and_per_rollout_tools():
    gate = threading.Event()

    def wait_gate() -> str:
        """Wait for the gate."""
        gate.wait(5)
        return "open"

    with ToolExecutor(timeout=5.0, max_workers=2) as ex:
        fut = ex.submit([ToolCall("wait_gate", {})], tools={"wait_gate": wait_gate})
        assert not fut.done()
        gate.set()
        assert fut.result(timeout=5)[0].content == "open"
        # the executor's own table is empty: the call is unknown without the per-rollout table
        assert ex.run([ToolCall("wait_gate", {})])[0].status == "unknown_tool"


def test_parse_error_appended_and_counted(ex):
    res = ex.run([ToolCall("add", {"a": 1})], parse_error="tool call 2: not valid JSON")
    assert [r.status for r in res] == ["ok", "parse_error"]
    assert res[1].call is None and res[1].content.startswith("Error: could not parse the tool call: tool call 2")
    assert ex.run([], parse_error="x")[0].status == "parse_error"
    m = ex.metrics(reset=True)
    assert m["parse_errors"] == 2 and m["calls"] == 1
    assert ex.metrics()["parse_errors"] == 0


def test_seconds_counted_and_submit_after_shutdown():
    ex = ToolExecutor({"nap": nap}, timeout=5.0, max_workers=1)
    ex.run([ToolCall("nap", {"seconds": 0.05})])
    assert 0.04 < ex.metrics()["seconds"] < 2
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit([ToolCall("nap", {"seconds": 0})])


def test_executor_config_errors():
    with pytest.raises(ValueError, match="timeout"):
        ToolExecutor({}, timeout=0, max_workers=1)
    with pytest.raises(ValueError, match="max_workers"):
        ToolExecutor({}, timeout=1, max_workers=0)


def test_abandoned_thread_gauge_and_own_timeout_error():
    async def raises_timeout() -> str:
        """Raises its own TimeoutError at once."""
        raise TimeoutError("upstream slow")

    with ToolExecutor({"nap": nap, "raises_timeout": raises_timeout}, timeout=0.1, max_workers=2) as ex:
        (own,) = ex.run([ToolCall("raises_timeout", {})])
        assert own.status == "error" and own.content == "TimeoutError: upstream slow"  # not our deadline
        assert ex.run([ToolCall("nap", {"seconds": 0.4})])[0].status == "timeout"
        assert ex.metrics(reset=True)["abandoned_threads"] == 1  # the nap still holds a worker
        deadline = time.perf_counter() + 3
        while ex.metrics()["abandoned_threads"] and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert ex.metrics()["abandoned_threads"] == 0  # it returned; its late result was dropped
        assert ex.metrics()["calls"] == 0


def test_builtin_without_signature_runs():
    with ToolExecutor({"max": max}, timeout=1, max_workers=1) as ex:
        (r,) = ex.run([ToolCall("max", {})])
    assert r.status == "error" and r.content.startswith("TypeError")


def test_calls_of_one_turn_run_in_order_unless_parallel():
    """A stateful environment must see a turn's calls in the order the model wrote them."""
    def make_log():
        log = []

        def slow_append(item: str) -> str:
            """Append slowly.

            Args:
                item: The item.
            """
            time.sleep(0.25)
            log.append(item)
            return item

        def fast_append(item: str) -> str:
            """Append at once.

            Args:
                item: The item.
            """
            log.append(item)
            return item

        return log, {"slow_append": slow_append, "fast_append": fast_append}

    calls = [ToolCall("slow_append", {"item": "first"}), ToolCall("fast_append", {"item": "second"})]
    log, table = make_log()
    with ToolExecutor(table, timeout=5, max_workers=4) as ex:
        assert [r.content for r in ex.run(calls)] == ["first", "second"]
    assert log == ["first", "second"]
    log, table = make_log()
    with ToolExecutor(table, timeout=5, max_workers=4, parallel_calls=True) as ex:
        assert [r.content for r in ex.run(calls)] == ["first", "second"]  # results keep the call order
    assert log == ["second", "first"]  # but they ran together


def test_next_call_starts_after_a_timeout():
    with ToolExecutor({"nap": nap, "add": add}, timeout=0.15, max_workers=2) as ex:
        t0 = time.perf_counter()
        res = ex.run([ToolCall("nap", {"seconds": 0.6}), ToolCall("add", {"a": 1})])
        assert [r.status for r in res] == ["timeout", "ok"] and time.perf_counter() - t0 < 0.5


def test_shutdown_mid_turn_resolves_with_not_run():
    ex = ToolExecutor({"nap": nap, "add": add}, timeout=5, max_workers=1)
    fut = ex.submit([ToolCall("nap", {"seconds": 0.2}), ToolCall("add", {"a": 1})])
    time.sleep(0.05)
    ex.shutdown()
    first, second = fut.result(timeout=5)
    assert first.status == "ok" and second.status == "error" and "shut down" in second.content
