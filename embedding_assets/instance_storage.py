"""Dagster's SQLite instance storage, with its connections kept open between events.

Dagster's own SQLite run and event-log storage builds a new SQLAlchemy engine and opens a new SQLite
connection for every event it writes (a run of the embedding chain writes about seventy), and each
commit waits for the disk. This storage is the same files and tables (a webserver or daemon on
Dagster's default storage reads and writes them as before) with a small pool of open connections per
database file and `PRAGMA synchronous` set on each connection: NORMAL by default, which in SQLite's
WAL mode keeps every committed event across a crash of the process and may lose the last ones on a
power failure; FULL restores Dagster's behaviour. A new run's event-log file is a copy of an empty
one that Dagster's own schema setup made once for this Dagster version (creating the tables and
stamping the migration revision took about 150 ms per run). The store of embeddings is not affected:
it keeps its own connections and settings.

`settings.dagster_home()` writes it into a new DAGSTER_HOME's dagster.yaml (`settings.instance_yaml`).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from dagster import __version__ as DAGSTER_VERSION
from dagster import _check as check
from dagster._config import Field, StringSource
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData
from dagster._utils import mkdir_p
from sqlalchemy.engine import Connection, Engine

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_SYNCHRONOUS = "NORMAL"
KEPT_EVENT_LOG_FILES = 4
"""Database files of the event log with open connections: the cross-run index and the latest runs'."""


class _Engines:
    """One pooled engine per SQLite file, the least recently used closed beyond `kept` files."""

    def __init__(self, synchronous: str, kept: int):
        self.synchronous = synchronous
        self.kept = kept
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, url: str) -> Engine:
        with self._lock:
            engine = self._engines.get(url)
            if engine is None:
                engine = self._engines[url] = self._create(url)
            self._engines.move_to_end(url)
            while len(self._engines) > self.kept:
                oldest = next(iter(self._engines))
                if oldest == url:
                    break
                self._engines.pop(oldest).dispose()
            return engine

    def _create(self, url: str) -> Engine:
        engine = sa.create_engine(
            url, poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=4,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        synchronous = self.synchronous

        @sa.event.listens_for(engine, "connect")
        def _configure(dbapi_connection, _record) -> None:
            dbapi_connection.execute(f"PRAGMA synchronous={synchronous}")

        return engine

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without closing them (they are the parent's)."""
        for engine in self._engines.values():
            engine.dispose(close=False)
        self._engines.clear()
        self._lock = threading.Lock()

    def dispose(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()


_ALL: list[_Engines] = []
os.register_at_fork(after_in_child=lambda: [engines.forget_after_fork() for engines in _ALL])


class PooledSqliteRunStorage(SqliteRunStorage):
    """Dagster's SQLite run storage on one pooled engine."""

    _engines: _Engines | None = None

    def use_engines(self, engines: _Engines) -> None:
        self._engines = engines

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        if self._engines is None:
            with super().connect() as conn:
                yield conn
            return
        with self._engines.get(self._conn_string).connect() as conn:
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        super().dispose()
        if self._engines is not None:
            self._engines.dispose()


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log (a file per run plus the cross-run index) on pooled engines."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None,
                 synchronous: str = DEFAULT_SYNCHRONOUS):
        self._engines = _Engines(synchronous, KEPT_EVENT_LOG_FILES)  # before the index file is first opened
        super().__init__(base_dir, inst_data=inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            check.str_param(shard, "shard")
            engine = self._engines.get(self.conn_string_for_shard(shard))
            if shard not in self._initialized_dbs:
                if not self._copied_from_template(shard):
                    self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def template_path(self) -> str:
        """The empty run file that new runs' files are copied from (not `*.db`: Dagster lists those as runs)."""
        return os.path.join(self._base_dir, f".run-template-{DAGSTER_VERSION}.sqlite")

    def _copied_from_template(self, shard: str) -> bool:
        """Create a run's missing file as a copy of the template; False when the file exists or the
        template cannot be made (Dagster's own setup then checks or creates it)."""
        path = self.path_for_shard(shard)
        if shard == INDEX_SHARD_NAME or os.path.exists(path):
            return False
        template = self._template()
        if template is None:
            return False
        partial = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            shutil.copyfile(template, partial)
            os.link(partial, path)  # fails if another process created the run's file meanwhile
            return True
        except OSError:
            return False
        finally:
            Path(partial).unlink(missing_ok=True)

    def _template(self) -> str | None:
        template = self.template_path()
        if os.path.exists(template):
            return template
        partial = f"{template}.{uuid.uuid4().hex}.partial"
        engine = sa.create_engine(f"sqlite:///{partial}", poolclass=sa.pool.NullPool)
        try:
            self._initdb(engine)
            engine.dispose()  # the last connection closed: the WAL is folded into the file and removed
            os.replace(partial, template)
            return template
        except (OSError, sa.exc.SQLAlchemyError):
            return None
        finally:
            engine.dispose()
            for leftover in (partial, f"{partial}-wal", f"{partial}-shm"):
                Path(leftover).unlink(missing_ok=True)

    def wipe(self) -> None:
        self._engines.dispose()  # the run files are deleted: no connection may stay open on them
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._engines.dispose()


class PooledSqliteStorage(DagsterSqliteStorage):
    """Runs, event logs and schedules in SQLite files under `base_dir`, laid out as Dagster's default storage."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None,
                 synchronous: str = DEFAULT_SYNCHRONOUS):
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        self.base_dir = check.str_param(base_dir, "base_dir")
        self.synchronous = synchronous.upper()
        self._run_storage = PooledSqliteRunStorage.from_local(_directory(base_dir, "history"))
        self._run_storage.use_engines(_Engines(self.synchronous, 1))
        self._event_log_storage = PooledSqliteEventLogStorage(
            _directory(base_dir, "history", "runs"), synchronous=self.synchronous
        )
        self._schedule_storage = SqliteScheduleStorage.from_local(_directory(base_dir, "schedules"))
        self._inst_data = check.opt_inst_param(inst_data, "inst_data", ConfigurableClassData)
        super(DagsterSqliteStorage, self).__init__()

    @classmethod
    def config_type(cls):
        return {
            "base_dir": StringSource,
            "synchronous": Field(
                StringSource, is_required=False, default_value=DEFAULT_SYNCHRONOUS,
                description="SQLite `PRAGMA synchronous` of the instance's connections: NORMAL (default) or FULL.",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value) -> PooledSqliteStorage:
        mkdir_p(config_value["base_dir"])
        return cls(inst_data=inst_data, **config_value)


def _directory(base_dir: str, *parts: str) -> str:
    return os.path.join(base_dir, *parts, "")
