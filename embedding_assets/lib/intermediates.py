"""How intermediate outputs are pickled: records as columns, and records of an earlier output named by position.

A list of dataclass records is kept as one list per field, far cheaper to pickle than the records. A list
whose records all belong to an output stored before it (a change plan's templates are the hashed templates',
whose templates are the FAQ's) is kept as positions in that output's blob, so each text is stored once and a
plan costs a few bytes per template. `dumps` says which blobs the bytes refer to (transitively): they must be
kept as long as these bytes are.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar

_READER: ContextVar[Callable[[str], list]] = ContextVar("intermediate_reader")


class Source:
    """An output already stored as blob `digest`, whose records later outputs may name by position."""

    def __init__(self, digest: str, refs: Sequence[str], items: list):
        self.digest = digest
        self.refs = tuple(refs)
        self.items = items  # kept alive, so the ids below stay theirs
        self.kind = type(items[0]) if items else None
        self.positions = {id(item): n for n, item in enumerate(items)}


def dumps(obj: object, sources: Sequence[Source] = ()) -> tuple[bytes, tuple[str, ...]]:
    """The bytes of `obj`, and the digests of the stored blobs they name (and those blobs name)."""
    refs: set[str] = set()
    data = pickle.dumps(_compact(obj, sources, refs), protocol=pickle.HIGHEST_PROTOCOL)
    return data, tuple(sorted(refs))


def loads(data: bytes, read_blob: Callable[[str], bytes], known: Mapping[str, list] | None = None) -> object:
    """The object `dumps` was given; `read_blob(digest)` returns a referred blob's bytes (each read once).

    `known` maps digests of blobs already loaded to their items, which are then named, not read again.
    """
    loaded: dict[str, list] = dict(known or {})

    def items_of(digest: str) -> list:
        if digest not in loaded:
            loaded[digest] = _loads(read_blob(digest), items_of)
        return loaded[digest]

    return _loads(data, items_of)


def is_source(obj: object) -> bool:
    """Whether later outputs can name `obj`'s items by position: a non-empty list of one kind of record."""
    return type(obj) is list and bool(obj) and _record_kind(obj) is not None


def _loads(data: bytes, items_of: Callable[[str], list]) -> object:
    token = _READER.set(items_of)
    try:
        return pickle.loads(data)
    finally:
        _READER.reset(token)


def _record_kind(items: list) -> type | None:
    """The dataclass every item is an exact instance of, when its fields can be passed back positionally."""
    kind = type(items[0])
    if not dataclasses.is_dataclass(kind) or any(type(item) is not kind for item in items):
        return None
    if any(not f.init or f.kw_only for f in dataclasses.fields(kind)):
        return None
    return kind


def _compact(obj: object, sources: Sequence[Source], refs: set[str]) -> object:
    if type(obj) is list and obj:
        kind = _record_kind(obj)
        if kind is None:
            return obj
        for source in sources:
            if source.kind is kind and all(id(item) in source.positions for item in obj):
                refs.update((source.digest, *source.refs))
                return _Positions(source.digest, [source.positions[id(item)] for item in obj])
        names = [f.name for f in dataclasses.fields(kind)]
        return _Columns(kind, [_compact([getattr(item, name) for item in obj], sources, refs) for name in names])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and _record_kind([obj]) is not None:
        return _Record(type(obj), {f.name: _compact(getattr(obj, f.name), sources, refs) for f in dataclasses.fields(obj)})
    return obj


class _Columns:
    def __init__(self, kind: type, columns: list):
        self.kind, self.columns = kind, columns

    def __reduce__(self):
        return _rows, (self.kind, self.columns)


class _Positions:
    def __init__(self, digest: str, positions: list[int]):
        self.digest, self.positions = digest, positions

    def __reduce__(self):
        return _named_items, (self.digest, self.positions)


class _Record:
    def __init__(self, kind: type, values: dict):
        self.kind, self.values = kind, values

    def __reduce__(self):
        return _record, (self.kind, self.values)


def _rows(kind: type, columns: list) -> list:
    return [kind(*values) for values in zip(*columns, strict=True)]


def _named_items(digest: str, positions: list[int]) -> list:
    reader = _READER.get(None)
    if reader is None:
        raise pickle.UnpicklingError("an intermediate output that names another one is read with intermediates.loads")
    items = reader(digest)
    return [items[n] for n in positions]


def _record(kind: type, values: dict) -> object:
    return kind(**values)
