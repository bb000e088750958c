"""Running tool calls without stopping the sampler.

``ToolExecutor.submit(calls)`` returns at once with a ``concurrent.futures.Future`` of the
results, so the sampler parks that sequence and keeps decoding the others (the turn handler may
answer with a Future: see grpo_fast/sampler/turns.py). Blocking tools run in a thread pool,
``async def`` tools on one background event loop. Nothing a tool does becomes an exception in
the rollout: it becomes a ToolResult whose status says what happened.

Timeouts: a call's clock starts when it starts running (a call queued behind a busy pool is not
charged for the wait). An async tool over time is cancelled. A blocking tool cannot be killed
from Python: its result is reported as "timeout" and later ignored, but its thread runs on and
holds a pool worker until the function returns (``metrics()["abandoned_threads"]`` counts them);
size ``max_workers`` for that, and give tools that may hang their own internal timeouts.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping

from .tools import ToolCall, ToolResult, stringify


def parse_error_result(error: str) -> ToolResult:
    """The observation for a tool call the model wrote but nobody could read."""
    return ToolResult(None, f"Error: could not parse the tool call: {error}", "parse_error")


class _Slot:
    """One call's outcome: the first of (result, timeout) wins; later ones are dropped."""

    def __init__(self, call: ToolCall, on_done: Callable[[], None]):
        self.call, self.on_done = call, on_done
        self.result: ToolResult | None = None
        self.started: float | None = None
        self.lock = threading.Lock()

    def claim(self, result: ToolResult) -> bool:
        with self.lock:
            if self.result is not None:
                return False
            self.result = result
            return True


class ToolExecutor:
    """Runs tool calls concurrently with per-call timeouts and keeps counters for the metrics.

    ``tools`` maps names to callables; ``submit(calls, tools=...)`` may pass another mapping for
    one rollout (an environment's bound methods) while sharing this executor's pool and loop.

    The calls of one ``submit`` (one model turn) run one after another, in the order the model
    wrote them, as TRL runs them: a stateful environment sees "move, then look" in that order.
    The next starts when the previous finishes or times out. Different submits (different
    rollouts) run concurrently. ``parallel_calls=True`` starts a turn's calls together instead.
    """

    def __init__(self, tools: Mapping[str, Callable] | None = None, *, timeout: float = 30.0,
                 max_workers: int = 8, parallel_calls: bool = False):
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.tools = dict(tools or {})
        self.timeout = float(timeout)
        self.parallel_calls = parallel_calls
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpo-fast-tool")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._counts = dict(calls=0, errors=0, timeouts=0, parse_errors=0, unknown_tools=0, seconds=0.0,
                            abandoned_threads=0)

    # -- public ------------------------------------------------------------------------------

    def submit(self, calls: list[ToolCall], *, tools: Mapping[str, Callable] | None = None,
               parse_error: str | None = None) -> Future:
        """Start the calls; the Future resolves to one ToolResult per call, in order, plus a
        parse-error result at the end when ``parse_error`` is given (the turn had a malformed
        call besides the readable ones). It never resolves to an exception."""
        if self._closed:
            raise RuntimeError("ToolExecutor.submit after shutdown()")
        table = self.tools if tools is None else tools
        out: Future = Future()
        extra = [parse_error_result(parse_error)] if parse_error is not None else []
        if extra:
            self._count(parse_errors=1)
        if not calls:
            out.set_result(extra)
            return out
        pending = [len(calls)]
        guard = threading.Lock()

        def one_done(index: int):
            with guard:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                out.set_result([s.result for s in slots] + extra)
            elif not self.parallel_calls:
                self._start(slots[index + 1], table)

        slots = [_Slot(c, lambda i=i: one_done(i)) for i, c in enumerate(calls)]
        for slot in slots if self.parallel_calls else slots[:1]:
            self._start(slot, table)
        return out

    def run(self, calls: list[ToolCall], **kw) -> list[ToolResult]:
        """``submit(...).result()``: for callers that may block."""
        return self.submit(calls, **kw).result()

    def metrics(self, reset: bool = False) -> dict:
        """Counters since construction (or the last reset): calls, errors (tool raised or bad
        arguments or unknown tool), timeouts, parse_errors, unknown_tools, seconds (tool wall time),
        and abandoned_threads: timed-out blocking tools still running now (a gauge, never reset;
        when it reaches max_workers, new blocking calls wait for a free worker)."""
        with self._lock:
            snap = dict(self._counts)
            if reset:
                self._counts = {k: (v if k == "abandoned_threads" else type(v)()) for k, v in self._counts.items()}
        return snap

    def shutdown(self, wait: bool = False) -> None:
        """Stop accepting calls, stop the event loop, release the pool (a hung blocking tool's
        thread is not waited for unless ``wait``). Turns still in flight resolve when their
        running blocking call returns (their remaining calls report "not run"); async calls
        in flight are dropped with the loop, so shut down between rollouts, not during one."""
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if wait and self._loop_thread is not None:
                self._loop_thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- internals ---------------------------------------------------------------------------

    def _count(self, **deltas):
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def _record(self, slot: _Slot, result: ToolResult, abandoned: int = 0) -> bool:
        """Report a call's outcome once; False when it was already reported (a timeout)."""
        if not slot.claim(result):
            return False
        elapsed = time.perf_counter() - slot.started if slot.started is not None else 0.0
        self._count(calls=1, seconds=elapsed, errors=int(result.status in ("error", "unknown_tool")),
                    timeouts=int(result.status == "timeout"),
                    unknown_tools=int(result.status == "unknown_tool"), abandoned_threads=abandoned)
        slot.on_done()  # after counting: whoever waits on the turn sees its counters
        return True

    def _start(self, slot: _Slot, table: Mapping[str, Callable]) -> None:
        call = slot.call
        if self._closed:  # the rest of a turn whose first call was running at shutdown()
            self._record(slot, ToolResult(call, f"Error: tool {call.name!r} not run: the executor was shut down",
                                          "error"))
            return
        fn = table.get(call.name)
        if fn is None:
            known = ", ".join(sorted(table)) or "(none)"
            self._record(slot, ToolResult(call, f"Error: unknown tool {call.name!r}; available tools: {known}",
                                          "unknown_tool"))
            return
        try:
            if not isinstance(call.arguments, dict):
                raise TypeError(f"arguments must be a JSON object, got {type(call.arguments).__name__}")
            try:
                sig = inspect.signature(fn)
            except ValueError:  # some builtins have no signature: let the call itself complain
                sig = None
            if sig is not None:
                sig.bind(**call.arguments)
        except TypeError as exc:
            self._record(slot, ToolResult(call, f"TypeError: {call.name}(): {exc}", "error"))
            return
        try:
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
                self._start_async(slot, fn)
            else:
                self._pool.submit(self._run_blocking, slot, fn)
        except RuntimeError as exc:  # shut down while a turn's calls were still queued
            self._record(slot, ToolResult(call, f"Error: tool {call.name!r} not run: {exc}", "error"))

    def _outcome(self, slot: _Slot, value=None, exc: BaseException | None = None) -> ToolResult:
        if exc is not None:
            return ToolResult(slot.call, f"{type(exc).__name__}: {exc}", "error")
        try:
            return ToolResult(slot.call, stringify(value), "ok")
        except Exception as e:  # a __str__ that raises
            return ToolResult(slot.call, f"{type(e).__name__}: {e}", "error")

    def _timeout_result(self, slot: _Slot) -> ToolResult:
        return ToolResult(slot.call, f"Error: tool {slot.call.name!r} timed out after {self.timeout:g} s", "timeout")

    def _run_blocking(self, slot: _Slot, fn: Callable) -> None:
        slot.started = time.perf_counter()
        timer = threading.Timer(self.timeout, self._expire, args=(slot,))
        timer.daemon = True
        timer.start()
        try:
            value = fn(**slot.call.arguments)
            if inspect.isawaitable(value):  # a sync wrapper returning a coroutine
                value = asyncio.run_coroutine_threadsafe(_await(value), self._event_loop()).result()
            result = self._outcome(slot, value)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a tool must not kill the worker
            result = self._outcome(slot, exc=exc)
        finally:
            timer.cancel()
        if not self._record(slot, result):  # it had timed out: its thread is free again
            self._count(abandoned_threads=-1)

    def _expire(self, slot: _Slot) -> None:
        # the tool's thread runs on, holding a pool worker, until the function returns
        self._record(slot, self._timeout_result(slot), abandoned=1)

    def _start_async(self, slot: _Slot, fn: Callable) -> None:
        async def guarded():
            slot.started = time.perf_counter()
            try:
                value = await asyncio.wait_for(fn(**slot.call.arguments), self.timeout)
                result = self._outcome(slot, value)
            except asyncio.TimeoutError as exc:  # ours, or the tool's own TimeoutError before the deadline
                late = time.perf_counter() - slot.started >= self.timeout * 0.999
                result = self._timeout_result(slot) if late else self._outcome(slot, exc=exc)
            except BaseException as exc:  # noqa: BLE001
                result = self._outcome(slot, exc=exc)
            self._record(slot, result)

        asyncio.run_coroutine_threadsafe(guarded(), self._event_loop())

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The background loop for async tools, started on first use (a daemon thread)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._loop_thread = threading.Thread(target=serve, name="grpo-fast-tool-loop", daemon=True)
                self._loop_thread.start()
                ready.wait()
                self._loop = loop
            return self._loop


async def _await(awaitable):
    return await awaitable
