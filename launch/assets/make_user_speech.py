#!/usr/bin/env python3
"""Rebuild the demo's user speech: launch/assets/user.wav (16 kHz mono s16le) and user.json.

    python3 launch/assets/make_user_speech.py        (needs espeak-ng; the output is committed)

The script is a short conversation with a barge-in: a long first sentence, a pause long enough
for the model to take its turn (end-of-speech silence, then its reply starts), then the user
talks over that reply, then stays quiet while the answer to the second sentence plays.
user.json records where each utterance is in the file, so the demo and its tests know the script.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soxr

HERE = Path(__file__).resolve().parent
RATE = 16000
VOICE, SPEED = "en-us", 170           # espeak-ng voice and words per minute

# (text, silence before it in seconds). The 1.8 s pause before the second line is the barge-in:
# a model that ends a turn after ~0.5 s of silence and answers within ~0.8 s is still speaking
# its (4 s) reply when the user starts again: about 1 s of it is heard, then it is cut.
SCRIPT = [
    ("Hello livepipe. Please tell me what you can see on my camera right now.", 0.5),
    ("Sorry, stop. Just say hello.", 1.8),
]
TAIL_S = 2.0                           # quiet while the second reply starts (the demo waits for its end)


def speak(text: str) -> np.ndarray:
    """espeak-ng -> int16 at 16 kHz, leading/trailing silence trimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(SPEED), "-w", str(wav), text], check=True)
        raw = wav.read_bytes()
    # espeak-ng writes a plain 44-byte-header PCM WAV at 22050 Hz mono
    rate = int.from_bytes(raw[24:28], "little")
    x = np.frombuffer(raw[44:], "<i2").astype(np.float32) / 32768.0
    y = soxr.resample(x, rate, RATE)
    loud = np.flatnonzero(np.abs(y) > 0.01)
    y = y[loud[0]:loud[-1] + 1]
    return np.clip(np.rint(y * 32767 * 0.9 / max(1e-6, np.abs(y).max())), -32768, 32767).astype(np.int16)


def main() -> int:
    parts: list[np.ndarray] = []
    utterances = []
    pos = 0
    for text, gap in SCRIPT:
        silence = np.zeros(int(gap * RATE), np.int16)
        speech = speak(text)
        parts += [silence, speech]
        start = pos + len(silence)
        pos = start + len(speech)
        utterances.append({"text": text, "start_s": round(start / RATE, 3), "end_s": round(pos / RATE, 3)})
    parts.append(np.zeros(int(TAIL_S * RATE), np.int16))
    audio = np.concatenate(parts)
    data = audio.astype("<i2").tobytes()
    header = (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt "
              + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
              + RATE.to_bytes(4, "little") + (RATE * 2).to_bytes(4, "little") + (2).to_bytes(2, "little")
              + (16).to_bytes(2, "little") + b"data" + len(data).to_bytes(4, "little"))
    (HERE / "user.wav").write_bytes(header + data)
    meta = {"wav": "user.wav", "rate": RATE, "seconds": round(len(audio) / RATE, 3),
            "voice": f"espeak-ng {VOICE} {SPEED} wpm", "utterances": utterances}
    (HERE / "user.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
