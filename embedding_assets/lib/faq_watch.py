"""Notice edits of the FAQ file: a cheap stat first, the content hash only when the stat moved."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileState:
    """What the watcher remembers of the file between evaluations (kept as the sensor cursor)."""

    mtime_ns: int
    size: int
    sha256: str
    edits: int = 0

    def to_cursor(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> FileState | None:
        if not cursor:
            return None
        try:
            return cls(**json.loads(cursor))
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Observation:
    """The outcome of one look at the file: a new state to remember, and whether the content changed."""

    state: FileState | None
    changed: bool
    reason: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def observe(path: str | Path, previous: FileState | None) -> Observation:
    """Compare the file with the remembered state; read it only when mtime or size moved."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return Observation(previous, False, f"FAQ file {path} not found")
    except OSError as exc:
        return Observation(previous, False, f"FAQ file {path} cannot be read ({exc.strerror or exc})")
    if not path.is_file():
        return Observation(previous, False, f"FAQ path {path} is not a file")
    if previous and (stat.st_mtime_ns, stat.st_size) == (previous.mtime_ns, previous.size):
        return Observation(previous, False, f"FAQ file {path} unchanged (content {previous.sha256[:12]})")
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        return Observation(previous, False, f"FAQ file {path} cannot be read ({exc.strerror or exc})")
    if previous and sha256 == previous.sha256:
        state = FileState(stat.st_mtime_ns, stat.st_size, sha256, previous.edits)
        return Observation(state, False, f"FAQ file {path} rewritten with the same content ({sha256[:12]})")
    edits = previous.edits + 1 if previous else 0
    state = FileState(stat.st_mtime_ns, stat.st_size, sha256, edits)
    return Observation(state, True, f"FAQ file {path} has new content ({sha256[:12]})")


def run_key(state: FileState, model_version: str) -> str:
    """One run per model version per edit: derived from the content hash and the edit's number."""
    return f"faq-{state.sha256[:16]}-edit-{state.edits}-{model_version}"
