"""A store at the edges: locked by another process, unreadable, on a full disk or a read-only volume, drifted."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.store import (
    ModelVersionMismatchError,
    StoreError,
    StoreLockedError,
    StoreReadOnlyError,
    open_store,
    open_store_for_rebuild,
)
from embedding_assets.store.base import mismatch_message
from embedding_assets_tests.conftest import make_template
from embedding_assets_tests.test_store_contract import TEN, TEN_VECTORS, V4, publish, vector_for
from embedding_assets_tests.test_store_contract import store_url  # noqa: F401  (fixture: both backends)

pytestmark = pytest.mark.reliability

FORK = multiprocessing.get_context("fork")
LOCK_SECONDS = 4.0
SHORT_WAIT = 0.5


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A closed store file with one published version (its WAL folded in, as a store looks at rest)."""
    path = tmp_path / "store.db"
    with open_store(path) as store:
        publish(store, V4, TEN, TEN_VECTORS)
    return path


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@contextmanager
def locked_by_another_process(path: Path, *, exclusive: bool = True, seconds: float = LOCK_SECONDS) -> Iterator[None]:
    """A subprocess holding the SQLite file: EXCLUSIVE locking mode shuts out readers too, IMMEDIATE only writers."""
    pragmas = "c.execute('PRAGMA locking_mode = EXCLUSIVE'); c.execute('BEGIN EXCLUSIVE')" if exclusive else (
        "c.execute('BEGIN IMMEDIATE')"
    )
    script = (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        f"{pragmas}\n"
        "c.execute(\"UPDATE store_meta SET value = value WHERE key = 'schema_version'\")\n"
        "print('locked', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


# --- 1. a lock is not damage ----------------------------------------------------------------------


def test_a_store_locked_by_another_process_is_reported_locked_after_the_busy_timeout(published: Path) -> None:
    with locked_by_another_process(published):
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as exc_info:
            open_store(published, create=False, busy_timeout=SHORT_WAIT)
        waited = time.monotonic() - started
    assert str(exc_info.value) == (
        f"{published} is locked by another process (waited {SHORT_WAIT:g} s; database is locked); "
        "try again when it is done (nothing was changed)"
    )
    assert waited >= SHORT_WAIT
    with open_store(published, create=False) as reader:
        assert len(reader.snapshot()) == 10


def test_a_rebuild_under_a_lock_moves_nothing_aside(published: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDING_ASSETS_BUSY_TIMEOUT", str(SHORT_WAIT))
    before = published.read_bytes()
    with locked_by_another_process(published):
        listed = _files(published.parent)
        with pytest.raises(StoreLockedError, match="is locked by another process"):
            open_store_for_rebuild(published)
        assert _files(published.parent) == listed
    assert not [name for name in _files(published.parent) if ".damaged-" in name]
    assert published.read_bytes() == before
    with open_store(published, create=False) as reader:
        assert (reader.generation(), len(reader.snapshot())) == (1, 10)


def test_status_under_a_lock_says_locked(published: Path) -> None:
    env = {**os.environ, "EMBEDDING_ASSETS_STORE": f"sqlite:///{published}", "EMBEDDING_ASSETS_BUSY_TIMEOUT": "0.5"}
    cli = Path(sys.executable).with_name("embedding-assets")
    with locked_by_another_process(published):
        locked = subprocess.run([cli, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert locked.returncode != 0
    assert f"{published} is locked by another process (waited 0.5 s; database is locked)" in locked.stderr
    assert "not an embedding store" not in locked.stderr
    free = subprocess.run([cli, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr
    assert "mini-v1: 10 rows, generation 1" in free.stdout


def test_a_publish_while_another_process_writes_waits_then_says_locked_and_changes_nothing(published: Path) -> None:
    with open_store(published, busy_timeout=SHORT_WAIT) as store:
        with locked_by_another_process(published, exclusive=False):
            assert len(store.snapshot()) == 10
            with pytest.raises(StoreLockedError, match=f"^{published} is locked by another process"):
                publish(store, V4, TEN[:4], TEN_VECTORS)
        assert (store.generation(), len(store.snapshot())) == (1, 10)


# --- 5. unreadable paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("create", [True, False])
def test_a_directory_in_place_of_the_store_is_named(tmp_path: Path, create: bool) -> None:
    directory = tmp_path / "store.db"
    directory.mkdir()
    with pytest.raises(StoreError) as exc_info:
        open_store(directory, create=create)
    assert str(exc_info.value) == f"{directory} is a directory, not an embedding store file"


def _open_as(uid: int, path: Path, create: bool) -> str:
    """open_store in a forked child running as `uid`; what it raised, as 'Type: message'."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        try:
            os.setgid(uid)
            os.setuid(uid)
            open_store(path, create=create).close()
            outcome = "opened"
        except BaseException as exc:  # noqa: BLE001 - the child reports whatever it got
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(writer, outcome.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(child, 0)
    return outcome


@pytest.mark.parametrize("create", [True, False])
def test_a_store_file_nobody_may_read_is_named_with_the_cause(create: bool) -> None:
    directory = Path(tempfile.mkdtemp(prefix="unreadable-store-"))
    try:
        directory.chmod(0o777)
        path = directory / "store.db"
        with open_store(path) as store:
            publish(store, V4, TEN, TEN_VECTORS)
        path.chmod(0o000)
        if os.geteuid() == 0:
            outcome = _open_as(65534, path, create)  # nobody: root reads a mode-000 file anyway
        else:
            try:
                open_store(path, create=create).close()
                outcome = "opened"
            except StoreError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
        assert outcome == f"StoreError: cannot open the embedding store {path}: Permission denied"
    finally:
        shutil.rmtree(directory)


@contextmanager
def mounted(*args: str, target: Path) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_a_full_disk_names_the_store_and_the_cause_and_keeps_the_published_generation(tmp_path: Path) -> None:
    with mounted("-t", "tmpfs", "-o", "size=640k", "tmpfs", target=tmp_path / "small") as small:
        path = small / "store.db"
        with open_store(path) as store:
            publish(store, V4, TEN, TEN_VECTORS)
            big = ModelVersion(key="big-v1", provider="local", model="big", dimension=1024)
            many = [make_template(n) for n in range(1, 2001)]
            with pytest.raises(StoreError) as exc_info:
                publish(store, big, many, {t.template_id: vector_for(n, 1024) for n, t in enumerate(many, 1)})
            assert str(exc_info.value) == (
                f"{path}: the disk is full (database or disk is full); nothing was written, free space and run again"
            )
            assert type(exc_info.value) is StoreError
        with open_store(path, create=False) as reader:
            assert (reader.generation(), [v.key for v in reader.versions()], len(reader.snapshot())) == (
                1, ["mini-v1"], 10
            )


# --- 6. a read-only volume ----------------------------------------------------------------------------


@pytest.mark.parametrize("left_open", [False, True], ids=["at rest", "with its WAL"])
def test_a_store_on_a_read_only_volume_is_read_read_only_and_writes_are_refused(
    tmp_path: Path, left_open: bool
) -> None:
    source = tmp_path / "volume"
    source.mkdir()
    path = source / "store.db"
    writer = open_store(path)
    publish(writer, V4, TEN, TEN_VECTORS)
    if not left_open:
        writer.close()
    try:
        with mounted("--bind", "-o", "ro", str(source), target=tmp_path / "ro") as volume:
            ro_path = volume / "store.db"
            with open_store(ro_path, create=False) as reader:
                assert reader.read_only
                assert reader.read_only_reason == f"{volume} is on a read-only file system"
                snapshot = reader.snapshot()
                assert (len(snapshot), snapshot.store_generation) == (10, 1)
                np.testing.assert_array_equal(snapshot.matrix[0], TEN_VECTORS["T-1"])
                with pytest.raises(StoreReadOnlyError) as exc_info:
                    publish(reader, V4, TEN[:3], TEN_VECTORS)
                assert str(exc_info.value) == (
                    f"{ro_path} is open read-only: {volume} is on a read-only file system; it cannot be written"
                )
            with pytest.raises(StoreReadOnlyError) as exc_info:
                open_store(ro_path)
            assert str(exc_info.value) == (
                f"{ro_path} cannot be written: {volume} is on a read-only file system; "
                "readers can still open it read-only"
            )
            if not left_open:
                env = {**os.environ, "EMBEDDING_ASSETS_STORE": f"sqlite:///{ro_path}"}
                cli = Path(sys.executable).with_name("embedding-assets")
                status = subprocess.run([cli, "status"], env=env, capture_output=True, text=True, timeout=120)
                assert status.returncode == 0, status.stderr
                assert status.stdout.splitlines()[0] == (
                    f"store sqlite:///{ro_path} at generation 1 (read-only: {volume} is on a read-only file system)"
                )
    finally:
        writer.close()


# --- 7. the drift guard names the field -----------------------------------------------------------------

OPENAI = ModelVersion(
    key="api-v1", provider="openai", model="text-embedding-3-small", dimension=256,
    settings={"dimensions": 256, "base_url": "http://a/v1"},
)


@pytest.mark.parametrize(
    ("stored", "configured", "named"),
    [
        (V4, replace(V4, text_template="{answer}"),
         "text_template differs (stored '{subcategory}: {question}\\n{answer}', configured '{answer}')"),
        (V4, replace(V4, settings={"variant": "test", "prefix": "passage: "}),
         "settings.prefix differs (stored unset, configured 'passage: ')"),
        (OPENAI, replace(OPENAI, settings={"dimensions": 512, "base_url": "http://a/v1"}),
         "settings.dimensions differs (stored 256, configured 512)"),
        (V4, replace(V4, model="mini-2", dimension=6),
         "model differs (stored 'mini', configured 'mini-2'); dimension differs (stored 4, configured 6)"),
    ],
)
def test_the_drift_guard_names_the_field_that_differs(store_url: str, stored, configured, named: str) -> None:  # noqa: F811
    with open_store(store_url) as store:
        dimension = stored.dimension
        publish(store, stored, TEN, {t.template_id: vector_for(n, dimension) for n, t in enumerate(TEN, 1)})
        before = store.snapshot(stored.key)
        vectors = {t.template_id: vector_for(n, configured.dimension) for n, t in enumerate(TEN, 1)}
        with pytest.raises(ModelVersionMismatchError) as exc_info:
            publish(store, configured, [*TEN, make_template(11)], {**vectors, "T-11": vector_for(11, configured.dimension)})
        assert str(exc_info.value) == (
            f"model version {stored.key!r} was published with different settings: {named}. "
            "Declare a new model version key for new settings, or rebuild this one with --force."
        )
        assert str(exc_info.value) == mismatch_message(configured, store.version(stored.key))
        assert store.snapshot(stored.key).store_generation == before.store_generation


def test_transport_settings_are_not_drift() -> None:
    moved = replace(OPENAI, settings={"dimensions": 256, "base_url": "http://b/v1", "timeout": 9})
    assert moved.fingerprint() == OPENAI.fingerprint()
