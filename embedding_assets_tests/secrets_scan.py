"""One scan for leaked secrets over everything a user or the Dagster UI can see.

A leak is any `WINDOW` consecutive characters of a sentinel secret: in a text (stdout, stderr, an
HTTP body, a log), in a file's name or in a file's bytes (the SQLite run and event databases of a
Dagster instance directory, a service log) under a directory. Sentinels should be ASCII letters,
digits, `-` and `#`, which every format here stores unescaped.

`no_secrets_in_outputs` is an autouse fixture for the reliability suite (import it into a test
module): it sets a sentinel API key and, after each test, scans the captured output and the test's
temporary directory for it and for the test PostgreSQL server's password.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

WINDOW = 8
SENTINEL_API_KEY = "sk-sentinelKEY-7c41d9e2b8"
SKIPPED_DIRECTORIES = {"__pycache__", ".venv", ".git"}


def fragments(secret: str, window: int = WINDOW) -> set[str]:
    """Every run of `window` consecutive characters of the secret (the whole secret when shorter)."""
    if len(secret) <= window:
        return {secret}
    return {secret[i : i + window] for i in range(len(secret) - window + 1)}


def _files(root: Path) -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in SKIPPED_DIRECTORIES]
        base = Path(directory)
        yield base
        for name in files:
            yield base / name


def find_leaks(
    secrets: Iterable[str | None],
    texts: Iterable[tuple[str, str]] = (),
    paths: Iterable[Path] = (),
) -> list[str]:
    """Where a fragment of a secret shows: `texts` are (label, text) pairs; `paths` are files or trees."""
    pieces = {piece for secret in secrets if secret for piece in fragments(secret)}
    encoded = {piece.encode() for piece in pieces}
    leaks = []
    for label, text in texts:
        leaks += [f"{label}: {piece!r}" for piece in sorted(pieces) if piece in text]
    for root in paths:
        if not root.exists():
            continue
        for path in _files(root) if root.is_dir() else [root]:
            leaks += [f"file name {path}: {piece!r}" for piece in sorted(pieces) if piece in path.name]
            if path.is_file():
                data = path.read_bytes()
                leaks += [f"bytes of {path}: {piece!r}" for piece in sorted(encoded) if piece in data]
    return leaks


def assert_no_leaks(secrets: Iterable[str | None], texts: Iterable[tuple[str, str]] = (),
                    paths: Iterable[Path] = ()) -> None:
    secrets = [s for s in secrets if s]
    assert secrets, "no sentinel to look for"
    leaks = find_leaks(secrets, texts, paths)
    assert leaks == [], "secret fragments leaked:\n" + "\n".join(leaks[:20])


def postgres_password(url: str) -> str | None:
    from embedding_assets.store.urls import parse_postgres

    return parse_postgres(url).password


@pytest.fixture(autouse=True)
def no_secrets_in_outputs(request, monkeypatch, capfd, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_API_KEY)
    yield
    secrets = [SENTINEL_API_KEY]
    if "postgres_server" in request.fixturenames:  # also when a test asked for it by name
        secrets.append(postgres_password(request.getfixturevalue("postgres_server")))
    out, err = capfd.readouterr()
    sys.stdout.write(out)  # still shown in the report of a failing test
    sys.stderr.write(err)
    assert_no_leaks(secrets, [("stdout", out), ("stderr", err)], [tmp_path])
