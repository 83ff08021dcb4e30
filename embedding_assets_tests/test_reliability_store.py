"""A damaged store: the pipeline says so plainly, refuses to guess, and rebuilds when forced."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from embedding_assets.store import open_store
from embedding_assets_tests.pipeline import failure_message, run_pipeline
from embedding_assets_tests.secrets_scan import no_secrets_in_outputs  # noqa: F401  (autouse)

pytestmark = pytest.mark.reliability

HINT = "rebuild it with `embedding-assets materialize --force` (the damaged file is kept beside it)"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _scribble_over_answers(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8192:-4096] = b"\x17" * 4096
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_truncate, "is not a readable embedding store (database disk image is malformed)"),
    "garbage": (_garbage, "is not a readable embedding store (file is not a database)"),
    "scribbled page": (_scribble_over_answers, "is damaged: "),
}


@pytest.fixture
def checkpointed(warm):
    """The warm store with its WAL folded into the main file, as a store looks at rest."""
    faq, store = warm
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    return faq, store


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_sqlite_store_is_reported_then_rebuilt_with_force(checkpointed, damage: str) -> None:
    faq, store = checkpointed
    corrupt, expected = DAMAGE[damage]
    corrupt(store)
    damaged = store.read_bytes()

    refused = run_pipeline(faq, store)

    assert not refused.result.success
    message = failure_message(refused.result)
    assert message.startswith(f"step change_plan failed: {store}")
    assert expected in message and message.endswith(HINT)
    assert refused.calls == []
    assert store.read_bytes() == damaged

    rebuilt = run_pipeline(faq, store, force=True)

    assert rebuilt.result.success, failure_message(rebuilt.result)
    assert (rebuilt.plan["new"], len(rebuilt.embedded_texts), rebuilt.store["rows"]) == (90, 90, 90)
    kept = [p for p in store.parent.iterdir() if p.name.startswith("store.db.damaged-")]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    with open_store(store, create=False) as reopened:
        reopened.check_integrity()
        assert len(reopened.snapshot()) == 90

    again = run_pipeline(faq, store)
    assert (again.result.success, again.calls) == (True, [])


def test_force_never_moves_another_applications_database(warm, tmp_path: Path) -> None:
    faq, _ = warm
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    content = other.read_bytes()

    outcome = run_pipeline(faq, other, force=True)

    assert not outcome.result.success
    assert failure_message(outcome.result) == (
        f"step change_plan failed: {other} is an SQLite file with other tables (users), not an embedding store"
    )
    assert other.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.db")) == ["app.db"]
