"""What to caption: PATH arguments (files, directories, globs, manifests) -> items with identities.

A directory is walked recursively; a file in it is an item when its content is video or audio
(probed with PyAV) or its name says it should be (so a broken `clip.mp4` gets an error record
instead of vanishing). Files named on the command line or in a manifest are always items.
Manifests: `.txt` (one path per line, `#` comments) or `.jsonl` (`{"path": ..., "prompt": ...}`),
relative paths resolved against the manifest's folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


MEDIA_SUFFIXES = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".mts", ".3gp",
    ".ogv", ".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wma", ".aiff", ".aif", ".amr",
}
MANIFEST_SUFFIXES = {".txt", ".jsonl"}


class InputError(ValueError):
    """A PATH argument or manifest that cannot be used (the job does not start)."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute
    prompt: str | None  # per-item prompt from a manifest
    size: int | None  # None: the file did not exist when listed (it gets an error record)
    mtime_ns: int | None

    @classmethod
    def at(cls, path: str, prompt: str | None = None) -> "Item":
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
            return cls(path, prompt, st.st_size, st.st_mtime_ns)
        except OSError:
            return cls(path, prompt, None, None)


def record_key(item: Item, prompt: str, options: dict, model: str) -> str:
    """The identity of one caption: the file (path, size, mtime) and everything that changes
    the caption. Equal keys mean the record in the log is this item's."""
    blob = json.dumps({"path": item.path, "size": item.size, "mtime_ns": item.mtime_ns, "prompt": prompt,
                       "options": options, "model": model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def model_identity(model_dir: str | Path) -> str:
    """Name plus a hash of config.json and the weight files' names, sizes and times: a changed
    checkpoint recaptions, a moved copy of the same files does not."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.name == "config.json":
            h.update(p.read_bytes())
        elif p.suffix == ".safetensors":
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{d.name}@{h.hexdigest()[:12]}"


def _walk(root: str, out: list[Item]) -> int:
    """Media files under root, sorted; returns how many non-media files were passed over."""
    from omni.jobs.decode import classify

    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if Path(name).suffix.lower() in MEDIA_SUFFIXES or classify(path) in ("video", "audio"):
                out.append(Item.at(path))
            else:
                ignored += 1
    return ignored


def _manifest(path: str, out: list[Item]) -> None:
    base = os.path.dirname(os.path.abspath(path))
    jsonl = path.lower().endswith(".jsonl")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read manifest ({e})") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt = None
        if jsonl:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                raise InputError(f'{path}:{n}: expected {{"path": "...", "prompt": "..."}}')
            line, prompt = obj["path"], obj.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise InputError(f"{path}:{n}: prompt must be a string")
        out.append(Item.at(os.path.join(base, os.path.expanduser(line)), prompt))


def expand(paths: list[str]) -> tuple[list[Item], int]:
    """PATH arguments -> (items in order, duplicates removed; count of non-media files passed over)."""
    items: list[Item] = []
    ignored = 0

    def one(p: str, named: bool) -> None:
        from omni.jobs.decode import classify

        nonlocal ignored
        if os.path.isdir(p):
            ignored += _walk(p, items)
        elif named and os.path.isfile(p) and Path(p).suffix.lower() in MANIFEST_SUFFIXES:
            _manifest(p, items)
        elif not named and Path(p).suffix.lower() not in MEDIA_SUFFIXES and classify(p) not in ("video", "audio"):
            ignored += 1  # a glob match that is not media: passed over, as in a directory
        else:
            items.append(Item.at(p))  # missing or not media: it gets an error record

    for p in paths:
        p = os.path.expanduser(p)
        if os.path.exists(p) or not glob.has_magic(p):
            one(p, True)
            continue
        matches = sorted(glob.glob(p, recursive=True))
        if not matches:
            raise InputError(f"{p}: no file matches")
        for m in matches:
            one(m, False)
    seen, unique = set(), []
    for it in items:
        if (it.path, it.prompt) not in seen:
            seen.add((it.path, it.prompt))
            unique.append(it)
    return unique, ignored
