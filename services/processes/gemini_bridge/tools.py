"""Tool calls: published on tool.call, answered from tool.result, or with an error after --tool-timeout."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livepipe.bus.message import Message
from livepipe.services.processes.gemini_bridge.settings import NAME

log = logging.getLogger(NAME)


class ToolSide:
    """Tool calls: published on tool.call, answered from tool.result, or with an error after --tool-timeout.

    Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    def on_tool_result(self, msg: Message) -> None:
        call_id = msg["id"]
        extra = self._result_options(msg)   # scheduling, will_continue (signals.py)
        if extra is None:
            return
        pending = self.pending_tools.pop(call_id, None)
        if pending is None:
            self.svc.metrics["tool_results_unknown"] += 1
            self.svc.ratelog.warning("tool-unknown", f"tool.result for call {call_id!r} that is not pending "
                                     "(answered, timed out or cancelled): ignored")
            return
        name, timer = pending
        timer.cancel()
        self.svc.metrics["tool_results"] += 1
        if extra.get("will_continue"):   # more results for this call follow: it stays pending
            self.pending_tools[call_id] = (name, asyncio.get_running_loop().call_later(
                self.s.tool_timeout, self._tool_timed_out, call_id))
        self._send_tool_response(call_id, msg["name"] or name, msg["response"], **extra)

    def _send_tool_response(self, call_id: str, name: str, response: dict[str, Any], **extra: Any) -> None:
        from google.genai import types
        fr = types.FunctionResponse(id=call_id, name=name, response=response, **extra)
        self._enqueue_event("tool", lambda ses: ses.send_tool_response(function_responses=[fr]))

    def _on_tool_calls(self, tool_call: Any) -> None:
        for fc in tool_call.function_calls or []:
            self._on_tool_call(fc)

    def _on_tool_cancellation(self, cancellation: Any) -> None:
        ids = [i for i in (cancellation.ids or []) if isinstance(i, str)]
        for i in ids:
            pending = self.pending_tools.pop(i, None)
            if pending:
                pending[1].cancel()
        self.svc.publish("tool.call", "cancel", ids=ids)

    def _on_tool_call(self, fc: Any) -> None:
        call_id = fc.id or f"call-{time.monotonic_ns()}"
        name = fc.name or ""
        self._open_turn()   # a tool call is part of the model turn it answers
        args = fc.args if isinstance(fc.args, dict) else {}
        self.svc.metrics["tool_calls"] += 1
        if not self.svc.has_subscriber("tool.call"):
            log.warning("tool call %s(%s): no process subscribes to tool.call: answering with an error", name, call_id)
            self._send_tool_response(call_id, name, {"error": "no tool handler is running"})
            return
        try:
            self.svc.publish("tool.call", "call", id=call_id, name=name, args=args)
        except Exception as exc:   # args that msgpack cannot carry
            self._send_tool_response(call_id, name, {"error": f"arguments not transportable: {exc}"})
            return
        timer = asyncio.get_running_loop().call_later(self.s.tool_timeout, self._tool_timed_out, call_id)
        self.pending_tools[call_id] = (name, timer)

    def _tool_timed_out(self, call_id: str) -> None:
        pending = self.pending_tools.pop(call_id, None)
        if pending is None:
            return
        self.svc.metrics["tool_timeouts"] += 1
        log.warning("tool call %s(%s): no tool.result within %g s: answering with an error",
                    pending[0], call_id, self.s.tool_timeout)
        self._send_tool_response(call_id, pending[0], {"error": f"no result within {self.s.tool_timeout:g} s"})

