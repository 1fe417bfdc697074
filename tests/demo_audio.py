"""Audio checks shared by the demo and launch tests: find the replies in what the user heard and
match them against the user's utterances (the emulator answers each utterance with itself)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parent.parent
USER_WAV = ROOT / "launch" / "assets" / "user.wav"
USER_SCRIPT = json.loads((ROOT / "launch" / "assets" / "user.json").read_text())
OUT_RATE = 24000


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    from livepipe.services.lib.audio import read_wav_int16
    return read_wav_int16(path)


def utterance_24k(index: int, pad_s: float = 0.15) -> np.ndarray:
    """Utterance `index` of the script (with a little silence around it), resampled to 24 kHz."""
    x, rate = read_wav(USER_WAV)
    u = USER_SCRIPT["utterances"][index]
    a = max(0, int((u["start_s"] - pad_s) * rate))
    b = min(len(x), int((u["end_s"] + pad_s) * rate))
    return soxr.resample(x[a:b].astype(np.float32) / 32768.0, rate, OUT_RATE)


def sound_segments(x: np.ndarray, rate: int, level: float = 0.003, min_gap_s: float = 0.6,
                   min_len_s: float = 0.08) -> list[tuple[int, int]]:
    """(start, end) sample ranges with sound, merging gaps shorter than min_gap_s (pauses in a sentence)."""
    f = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x
    loud = np.flatnonzero(np.abs(f) > level)
    if not len(loud):
        return []
    segs: list[list[int]] = [[int(loud[0]), int(loud[0]) + 1]]
    gap = int(min_gap_s * rate)
    for i in loud[1:]:
        if i - segs[-1][1] > gap:
            segs.append([int(i), int(i) + 1])
        else:
            segs[-1][1] = int(i) + 1
    return [(a, b) for a, b in segs if b - a >= min_len_s * rate]


def best_match(piece: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """Highest normalised cross-correlation of `piece` against any same-length window of `ref`,
    and the window's offset (1.0 = identical up to a gain)."""
    a = piece.astype(np.float64)
    b = ref.astype(np.float64)
    if len(b) < len(a):
        b = np.concatenate([b, np.zeros(len(a) - len(b))])
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    dots = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[:len(b) - len(a) + 1]
    energy = np.concatenate([[0.0], np.cumsum(b * b)])
    windows = energy[len(a):] - energy[:len(b) - len(a) + 1]
    norm = np.sqrt(np.maximum(windows, 1e-12) * float(np.sum(a * a)))
    corr = dots / norm
    k = int(np.argmax(corr))
    return float(corr[k]), k


def piecewise_match(piece: np.ndarray, ref: np.ndarray, window_s: float = 0.2, slack_s: float = 0.1,
                    rate: int = OUT_RATE) -> float:
    """Share of the piece's voiced windows that match `ref` (correlation > 0.9) near where the whole
    piece matches best: tolerant of a few milliseconds lost or inserted by a real sound device
    under load, but not of different words."""
    _, lag = best_match(piece[:int(rate * 0.5)], ref)
    w, slack = int(window_s * rate), int(slack_s * rate)
    good = total = 0
    for off in range(0, len(piece) - w + 1, w):
        win = piece[off:off + w]
        if np.sqrt(np.mean(win.astype(np.float64) ** 2)) < 0.01:
            continue   # a pause between words: nothing to compare
        lo = max(0, lag + off - slack)
        region = ref[lo:lag + off + w + slack]
        total += 1
        good += len(region) >= w and best_match(win, region)[0] > 0.9
    return good / total if total else 0.0


def check_replies(heard: np.ndarray, rate: int, exact: bool = True) -> list[dict]:
    """What a listener would notice: two replies; the first cut short by the barge-in, the second
    whole; each is the user's utterance played back. `exact`: sample for sample (a file sink);
    otherwise 75 % of it window by window (real devices may slip a few ms). Returns the segments."""
    assert rate == OUT_RATE
    segs = sound_segments(heard, rate)
    assert len(segs) == 2, f"expected 2 replies in what was heard, found {len(segs)}: " \
                           f"{[(a / rate, b / rate) for a, b in segs]}"
    out = []
    for i, (a, b) in enumerate(segs):
        u = USER_SCRIPT["utterances"][i]
        utter_s = u["end_s"] - u["start_s"]
        piece, ref = heard[a:b].astype(np.float32) / 32768.0, utterance_24k(i)
        corr, _ = best_match(piece, ref)
        share = 1.0 if exact else piecewise_match(piece, ref)
        out.append({"start_s": a / rate, "seconds": (b - a) / rate, "utterance_s": utter_s, "corr": corr,
                    "windows_matching": share})
        if exact:
            assert corr > 0.9, f"reply {i + 1} does not match utterance {i + 1} (correlation {corr:.3f})"
        else:
            assert share >= 0.75, f"reply {i + 1} does not sound like utterance {i + 1} ({share:.0%} of it matches)"
    first, second = out
    assert first["seconds"] < first["utterance_s"] - 1.0, f"the interrupted reply was not cut short: {first}"
    assert first["seconds"] > 0.2, f"the first reply was hardly heard before the barge-in: {first}"
    assert abs(second["seconds"] - second["utterance_s"]) < 0.3, f"the second reply is not whole: {second}"
    return out
