"""The recording file format used by `livepipe record`, `replay` and `export`.

A recording is a stream that is appended to while the bus runs, so it survives the recorder
being killed at any moment:

    line 1:  b"LIVEPIPE-RECORDING 1\\n"                 (magic and format version)
    then a msgpack stream (bin type for bytes):
      one map   {"format": 1, "created_ns": int, "session": str, "topics": [str...], "host": str}
      records   [recv_ns: int, [frame: bytes, ...]]     (one per bus message, in receipt order)

`frames` are the ZeroMQ frames exactly as received (topic frame with its session prefix,
msgpack header, payload), so a recording holds bus frames and nothing else. `recv_ns` is
the recorder's wall clock at receipt (ns since the epoch). Every record is written with one
flush, so a reader sees a prefix of complete records plus, at worst, a truncated last one,
which it ignores (and reports through `RecordingReader.truncated_bytes`).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import msgpack

from livepipe.services.lib.verb import VerbError

MAGIC = b"LIVEPIPE-RECORDING 1\n"
FORMAT_VERSION = 1


class RecordingError(VerbError, ValueError):
    """The file is not a livepipe recording, or is damaged before its last record."""


class RecordingWriter:
    """Append bus messages to a recording; each record reaches the OS before `write` returns."""

    def __init__(self, path: str | os.PathLike, session: str = "", topics: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")
        self._packer = msgpack.Packer(use_bin_type=True)
        self.count = 0
        self.bytes = 0
        meta = {"format": FORMAT_VERSION, "created_ns": time.time_ns(), "session": session,
                "topics": list(topics), "host": socket.gethostname()}
        self._file.write(MAGIC + self._packer.pack(meta))
        self._file.flush()

    def write(self, recv_ns: int, frames: Sequence[bytes | memoryview]) -> None:
        data = self._packer.pack([recv_ns, [bytes(f) for f in frames]])
        self._file.write(data)
        # One flush per record: a SIGKILL loses at most the record being written.
        self._file.flush()
        self.count += 1
        self.bytes += len(data)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:  # e.g. a pipe or a filesystem without fsync: the data is written anyway
            pass
        self._file.close()

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingReader:
    """Iterate over `(recv_ns, frames)` of a recording; tolerant of a truncated last record."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        self.truncated_bytes = 0     # bytes after the last complete record (a write cut short)
        self._file: BinaryIO = open(self.path, "rb")
        try:
            magic = self._file.read(len(MAGIC))
            if magic != MAGIC:
                if magic.startswith(b"LIVEPIPE-RECORDING "):
                    raise RecordingError(f"{self.path}: recording format {magic[19:].strip()!r} "
                                         f"is not supported (this livepipe reads format {FORMAT_VERSION})")
                raise RecordingError(f"{self.path} is not a livepipe recording")
            self._unpacker = msgpack.Unpacker(self._file, raw=False, strict_map_key=True,
                                              max_buffer_size=256 * 1024 * 1024)
            try:
                meta = self._unpacker.unpack()
            except msgpack.OutOfData:
                meta = {}   # killed before the header was complete: an empty recording
            except Exception as exc:
                raise RecordingError(f"{self.path}: damaged recording header ({type(exc).__name__})") from None
            if not isinstance(meta, dict):
                raise RecordingError(f"{self.path}: damaged recording header")
            self.meta = meta
        except BaseException:
            self._file.close()
            raise

    @property
    def session(self) -> str:
        session = self.meta.get("session", "")
        return session if isinstance(session, str) else ""

    def __iter__(self) -> Iterator[tuple[int, list[bytes]]]:
        index = 0
        while True:
            try:
                record = self._unpacker.unpack()
            except msgpack.OutOfData:
                break
            except Exception as exc:
                raise RecordingError(f"{self.path}: record {index} is damaged ({type(exc).__name__})") from None
            if (not isinstance(record, list) or len(record) != 2 or not isinstance(record[0], int)
                    or not isinstance(record[1], list) or not all(isinstance(f, bytes) for f in record[1])):
                raise RecordingError(f"{self.path}: record {index} is not [recv_ns, [frames...]]")
            index += 1
            yield record[0], record[1]
        size = os.fstat(self._file.fileno()).st_size
        self.truncated_bytes = max(0, size - len(MAGIC) - self._unpacker.tell())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_all(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[int, list[bytes]]], int]:
    """(meta, records, truncated_bytes) of a whole recording: for tests and small files."""
    with RecordingReader(path) as reader:
        records = list(reader)
        return reader.meta, records, reader.truncated_bytes
