"""`livepipe console`: a local web page to watch and steer a live conversation.

The console is one more process on the bus (a `Service`). It keeps a small model of the
conversation (turns, levels, processes, latencies, the last video frame) and pushes it as JSON
over a WebSocket to the page it serves (static/: plain HTML, CSS and JS, no build step).
aiohttp is imported only when this verb runs.
"""
from __future__ import annotations


def main(argv: list[str]) -> int:
    from livepipe.services.processes.console.server import main as server_main
    return server_main(argv)


__all__ = ["main"]
