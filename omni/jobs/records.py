"""The job's output: an append-only JSONL of records, exactly once per key, and subtitles from it.

A record is one line written with a single `write` on an O_APPEND descriptor, then fsync'd, so
after a crash (SIGKILL, power loss) the file holds whole records plus at most one half-written
last line. Opening the log cuts that line off (its item is redone) and reads the keys present;
a job skips every key already there. One job at a time per file (an exclusive flock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("omni.caption")


class LogBusy(RuntimeError):
    """Another job holds the output file."""


class RecordLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LogBusy(f"{self.path}: another job is writing it; wait for it or choose another --out") from None
        self.records: dict[str, dict] = {}  # key -> its latest record
        self.repaired = 0  # bytes of a half-written last line cut off
        self.bad_lines = 0
        self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a half-written last record: drop it, its item is redone
            self.repaired = len(data) - end
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            log.warning("%s: dropped a half-written last record (%d bytes); its item is redone", self.path,
                        self.repaired)
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1
                log.warning("%s:%d: not a record; ignored", self.path, n)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:  # a regular file takes it whole; loop only for the pathological short write
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.records[record["key"]] = record

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def timestamp(seconds: float, fmt: str) -> str:
    """SRT 'HH:MM:SS,mmm' or VTT 'HH:MM:SS.mmm'."""
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{',' if fmt == 'srt' else '.'}{ms:03d}"


def _cue_text(text: str, fmt: str) -> str:
    # A blank line ends a cue in both formats, and "-->" inside a VTT cue breaks parsing.
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    out = "\n".join(lines)
    return out.replace("-->", "->") if fmt == "vtt" else out


def subtitles(segments: list[dict], fmt: str) -> str:
    """segments [{start, end, text}] -> the text of an SRT or VTT file (segments without text skipped)."""
    cues = []
    for seg in segments:
        text = _cue_text(seg.get("text") or "", fmt)
        if not text:
            continue
        span = f"{timestamp(seg['start'], fmt)} --> {timestamp(seg['end'], fmt)}"
        cues.append(f"{len(cues) + 1}\n{span}\n{text}\n" if fmt == "srt" else f"{span}\n{text}\n")
    head = "WEBVTT\n\n" if fmt == "vtt" else ""
    return head + "\n".join(cues)


def write_subtitles(records: list[dict], out: Path, fmt: str) -> list[Path]:
    """One subtitle file per captioned item, beside `out`, named after the media file
    (`clip.srt`; `clip-<key>.srt` when two items share a name). Written atomically."""
    ok = sorted((r for r in records if r.get("status") == "ok" and r.get("segments")), key=lambda r: r["path"])
    stems: dict[str, int] = {}
    for r in ok:
        stem = Path(r["path"]).stem
        stems[stem] = stems.get(stem, 0) + 1
    written = []
    for r in ok:
        stem = Path(r["path"]).stem
        name = stem if stems[stem] == 1 else f"{stem}-{r['key'][:8]}"
        target = out.parent / f"{name}.{fmt}"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(subtitles(r["segments"], fmt))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, target)
        written.append(target)
    return written
