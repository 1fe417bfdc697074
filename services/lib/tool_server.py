"""Serve functions to the model from any process: announce them on tool.announce, answer the
tool.call messages routed to this process on tool.result; a call the model cancels is not answered.

    svc = Service("clock")
    tools = serve_tools(svc, {"get_time": ({"name": "get_time", "description": "the time now"},
                                           lambda args: {"time": time.strftime("%H:%M")})})
    sys.exit(svc.main(tools.run))

A handler takes the call's args (a dict) and returns the response (a dict); it may be async (run
on the event loop), a plain function runs in a worker thread.
An exception becomes {"error": "..."} for the model: a failing tool never stops the process.
The bridge forgets the functions when the process withdraws them (on a clean stop) or stops
heartbeating (a crash), and asks for them again when it starts (tool.query).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Callable, Mapping, Union

from livepipe.bus import Service
from livepipe.bus.message import Message

Handler = Callable[[dict[str, Any]], Union[dict[str, Any], Awaitable[dict[str, Any]]]]


class ToolServer:
    """What serve_tools returns: pass `run` to Service.main (alone or with the process's own mains)."""

    def __init__(self, svc: Service, functions: Mapping[str, tuple[dict[str, Any], Handler]]) -> None:
        for name, (decl, _) in functions.items():
            if decl.get("name") != name:
                raise ValueError(f"serve_tools: the declaration of {name!r} is named {decl.get('name')!r}")
        self.svc = svc
        self.functions = dict(functions)
        self.log = svc.log if isinstance(svc.log, logging.Logger) else logging.getLogger(svc.name)
        for k in ("tool_calls_served", "tool_calls_failed", "tool_calls_cancelled"):
            svc.metrics[k] = 0
        self._tasks: dict[str, asyncio.Task] = {}   # call id -> the task answering it
        svc.on("tool.call", self._on_call)
        svc.on("tool.query", lambda _msg: self.announce())

    def announce(self) -> None:
        self.svc.publish("tool.announce", "announce", functions=[d for d, _ in self.functions.values()])

    async def run(self, svc: Service) -> None:
        """Announce once a bridge listens, then serve until the process stops; withdraw on the way out."""
        try:
            if await svc.wait_subscriber("tool.announce"):
                self.announce()
            await asyncio.Event().wait()
        finally:
            try:
                svc.publish("tool.announce", "withdraw")
            except Exception:   # the bus is already closing: the bridge notices the missing heartbeat
                pass

    def _on_call(self, msg: Message) -> None:
        if msg.kind == "cancel":   # the model no longer waits for these: no late result
            for call_id in msg.get("ids") or []:
                task = self._tasks.pop(call_id, None) if isinstance(call_id, str) else None
                if task is not None:
                    task.cancel()
                    self.svc.metrics["tool_calls_cancelled"] += 1
            return
        # Only calls the bridge routed here: one without `to` is for a --tools function (which wins
        # over an announced one of the same name), one with another `to` for another process.
        if msg.kind != "call" or msg["name"] not in self.functions or msg.get("to") != self.svc.inst:
            return
        # its own task: a slow function never holds up the events lane (other calls, queries)
        call_id = msg["id"]
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._tasks[call_id] = task
        task.add_done_callback(lambda t: self._tasks.pop(call_id, None) if self._tasks.get(call_id) is t else None)

    async def _answer(self, msg: Message) -> None:
        _, handler = self.functions[msg["name"]]
        try:
            if inspect.iscoroutinefunction(handler):
                response = await handler(dict(msg["args"]))
            else:   # a plain function runs in a worker thread: a slow one never stops the heartbeats
                response = await asyncio.to_thread(handler, dict(msg["args"]))
                if inspect.isawaitable(response):
                    response = await response
            if not isinstance(response, dict):
                raise TypeError(f"returned {type(response).__name__}, not a dict")
            self.svc.metrics["tool_calls_served"] += 1
        except Exception as exc:
            self.svc.metrics["tool_calls_failed"] += 1
            self.log.warning("tool %s failed: %s: %s", msg["name"], type(exc).__name__, exc)
            response = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            self.svc.publish("tool.result", "result", id=msg["id"], name=msg["name"], response=response)
        except Exception as exc:   # a response msgpack cannot carry
            self.svc.metrics["tool_calls_failed"] += 1
            self.svc.publish("tool.result", "result", id=msg["id"], name=msg["name"],
                             response={"error": f"result not transportable: {exc}"})


def serve_tools(svc: Service, functions: Mapping[str, tuple[dict[str, Any], Handler]]) -> ToolServer:
    """Serve `functions` ({name: (declaration, handler)}) from `svc`; register before svc.main."""
    return ToolServer(svc, functions)
