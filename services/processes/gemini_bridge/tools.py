"""Tool calls: published on tool.call, answered from tool.result, or with an error after --tool-timeout."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from livepipe.bus.message import Message
from livepipe.services.processes.gemini_bridge.settings import NAME

log = logging.getLogger(NAME)

ANNOUNCE_TTL_S = 3.5     # an announcer silent this long (no heartbeat, no announce) loses its functions
FUNCTION_NAME = re.compile(r"^[A-Za-z_][\w.-]{0,63}$")


def valid_declarations(decls: Any) -> bool:
    """A list of function declarations, each a map with a usable name."""
    return isinstance(decls, list) and all(isinstance(d, dict) and isinstance(d.get("name"), str) and
                                           FUNCTION_NAME.match(d["name"]) for d in decls)


class ToolSide:
    """Tool calls: published on tool.call, answered from tool.result, or with an error after --tool-timeout.

    Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    # ------------------------------------------------ functions announced on the bus
    def on_tool_announce(self, msg: Message) -> None:
        """A process announces the functions it serves (or withdraws them): they join --tools."""
        inst = msg["inst"]
        if msg.kind == "withdraw":
            if self.announcers.pop(inst, None) is not None:
                log.info("tools of %s (%s) withdrawn", msg["src"], inst)
                self._listen_for_heartbeats()
                self._announced_changed()
            return
        functions = msg["functions"]
        if not valid_declarations(functions):
            self.svc.metrics["tool_announces_rejected"] += 1
            self.svc.ratelog.warning("tool-announce", f"tool.announce from {msg['src']}: every function needs a "
                                     "\"name\" (letters, digits, _ . -): ignored")
            return
        known = self.announcers.get(inst)
        self.announcers[inst] = (msg["src"], list(functions), time.monotonic())
        self._listen_for_heartbeats()
        if known is None or known[1] != functions:
            log.info("%s (%s) serves %s", msg["src"], inst, ", ".join(d["name"] for d in functions) or "nothing")
            self._announced_changed()

    def _listen_for_heartbeats(self) -> None:
        """Heartbeats matter only while some process serves functions: without one, the bridge is
        not woken by every process's status message (about 6 a second in a pipeline)."""
        self.svc.listen("status", bool(self.announcers))

    def on_status(self, msg: Message) -> None:
        known = self.announcers.get(msg["inst"])
        if known is not None:   # a heartbeat keeps an announcer's functions
            self.announcers[msg["inst"]] = (known[0], known[1], time.monotonic())

    async def expire_announcers(self) -> None:
        """Drop the functions of processes that stopped heartbeating (crashed or killed)."""
        self.svc.publish("tool.query", "query")   # processes started before us announce again
        self._listen_for_heartbeats()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            gone = [i for i, (_, _, seen) in self.announcers.items() if now - seen > ANNOUNCE_TTL_S]
            for inst in gone:
                log.warning("tools of %s (%s): no heartbeat for %.1f s: removed", self.announcers[inst][0], inst,
                            ANNOUNCE_TTL_S)
                del self.announcers[inst]
            if gone:
                self._announced_changed()
                self._listen_for_heartbeats()

    def merged_tools(self) -> list[dict[str, Any]]:
        """--tools (or the last context_update's tools), then announced functions; the first
        declaration of a name wins. Sets the routes: function name -> announcer inst."""
        tools = list(self.base_tools)
        names = {d["name"] for d in tools}
        self.tool_routes = {}
        for inst, (src, functions, _) in self.announcers.items():
            for d in functions:
                if d["name"] in names:
                    self.svc.ratelog.warning("tool-dup", f"{src} announces {d['name']!r}, "
                                             "already declared: the first declaration is kept")
                    continue
                names.add(d["name"])
                self.tool_routes[d["name"]] = inst
                tools.append(d)
        return tools

    def _announced_changed(self) -> None:
        tools = self.merged_tools()
        self.svc.metrics["tools_announced"] = len(self.tool_routes)
        if tools != (self.s.tools or []):
            self.s.tools = tools or None
            self._push_context(None, tools)

    # ------------------------------------------------------------------ calls
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
        self.turn_answered = True
        args = fc.args if isinstance(fc.args, dict) else {}
        self.svc.metrics["tool_calls"] += 1
        if not self.svc.has_subscriber("tool.call"):
            log.warning("tool call %s(%s): no process subscribes to tool.call: answering with an error", name, call_id)
            self._send_tool_response(call_id, name, {"error": "no tool handler is running"})
            return
        route = {"to": self.tool_routes[name]} if name in self.tool_routes else {}
        try:
            self.svc.publish("tool.call", "call", id=call_id, name=name, args=args, **route)
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

