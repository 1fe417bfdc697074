"""`livepipe VERB ...`: one command, a verb per process and tool.

Each verb's module is imported only when that verb runs, so `livepipe tap` never pays
for google-genai, sounddevice or OpenCV.
"""
from __future__ import annotations

import importlib
import sys

# verb -> (module, one-line help). Every module has `main(argv: list[str]) -> int`.
VERBS: dict[str, tuple[str, str]] = {
    "broker": ("livepipe.services.processes.broker", "the XSUB/XPUB rendezvous every process connects to"),
    "keys": ("livepipe.services.tools.keys", "generate CURVE key pairs for the broker and its clients"),
    "tap": ("livepipe.services.tools.tap", "print, or measure (--stats), what flows on topics"),
    "top": ("livepipe.services.tools.top", "a live table per process, from the heartbeats"),
    "record": ("livepipe.services.tools.record", "record topics to a file"),
    "replay": ("livepipe.services.tools.replay", "republish a recording (--speed, --loop)"),
    "export": ("livepipe.services.tools.export", "write an audio topic of a recording as WAV"),
    "say": ("livepipe.services.tools.say", "publish a line of text on text.in"),
    "transcript": ("livepipe.services.tools.transcript", "the conversation in the terminal: ready, transcripts, interrupts, mic level"),
    "update": ("livepipe.services.tools.update", "new system instruction / tools / history for the live model session"),
    "emulator": ("livepipe.services.processes.emulator", "a local Live API emulator (the default backend with no key)"),
    "gemini-bridge": ("livepipe.services.processes.gemini_bridge", "the Live API session on the bus"),
    "capture-audio": ("livepipe.services.processes.capture_audio", "microphone or WAV file -> audio.in"),
    "playback": ("livepipe.services.processes.playback", "audio.out -> speaker or WAV file, with instant interrupt"),
    "capture-video": ("livepipe.services.processes.capture_video", "camera, file or screen -> JPEG frames on video.in"),
    "console": ("livepipe.services.processes.console", "a local web page to watch and steer the conversation"),
    "supervise": ("livepipe.services.tools.supervise", "run one process, restarting it when it dies (for Procfiles)"),
    "demo": ("livepipe.services.demo.demo", "a scripted conversation that runs anywhere"),
    "bench": ("livepipe.services.bench", "benchmarks printing JSON: bench bus | interrupt | ..."),
}


# A library a verb may miss on a partial install -> the extra that brings it (pyproject.toml).
EXTRA_OF_MODULE: dict[str, str] = {
    "sounddevice": "audio", "soxr": "audio", "cv2": "video", "mss": "video", "PIL": "video", "google": "gemini",
    "websockets": "emulator", "trustme": "emulator", "webrtcvad": "emulator", "honcho": "demo",
    "aiohttp": "console",
}


def missing_extra_message(verb: str, exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, when `exc` is a library of one of livepipe's extras."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"livepipe {verb}: the Python package {top!r} is not installed; "
            f"install it with: pip install 'livepipe[{extra}]'  (or 'livepipe[all]')")


def version() -> str:
    """The installed distribution's version (pyproject.toml), without importing any verb."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("livepipe")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: livepipe VERB [options]   (livepipe VERB --help for a verb's options; livepipe --version)",
             "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(f"livepipe {version()}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"livepipe: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(VERBS[verb][0])
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(verb, exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
