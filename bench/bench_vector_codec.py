"""pgvector-python's psycopg2 helpers against the store's binary COPY codec, loading and reading vectors.

Loads ROWS template rows (dimension DIM) into a store-shaped table in one transaction and reads the
vectors back as one float32 matrix, both ways, in the same run against the same server:
- binary COPY: the store's path (`COPY … FROM STDIN (FORMAT binary)` into a staging table, then
  INSERT … ON CONFLICT; `COPY (SELECT …) TO STDOUT (FORMAT binary)` parsed with numpy);
- pgvector helpers: `register_vector` adapters with `execute_values` INSERT … ON CONFLICT, and
  a plain SELECT returning `pgvector.Vector` objects (`.to_numpy()`).

Run: `.venv/bin/python bench/bench_vector_codec.py [--rows 10000] [--dim 384] [--repeat 3]`; best of
`repeat` per cell. The server is found like the tests find it. Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2.extras import execute_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.store.postgres import _TEMPLATE_KINDS, _copy_binary, _parse_vectors  # noqa: E402
from embedding_assets_tests.postgres import new_database, postgres_server_url  # noqa: E402

TABLE = """
CREATE EXTENSION IF NOT EXISTS vector;
DROP TABLE IF EXISTS bench_templates;
CREATE TABLE bench_templates (
    model_version text NOT NULL, template_id text NOT NULL, content_hash text NOT NULL, category text NOT NULL,
    subcategory text NOT NULL, question text NOT NULL, answer text NOT NULL, priority text NOT NULL,
    audience text NOT NULL, source_row integer NOT NULL, embedding vector NOT NULL,
    PRIMARY KEY (model_version, template_id)
);
"""
UPSERT = (
    "ON CONFLICT (model_version, template_id) DO UPDATE SET content_hash = EXCLUDED.content_hash, "
    "embedding = EXCLUDED.embedding"
)


def rows_for(count: int, dim: int) -> list[tuple]:
    vectors = np.random.default_rng(7).normal(size=(count, dim)).astype(np.float32)
    return [
        ("bench-v1", f"S-{i:06d}", f"{i:064x}", "Карты", f"Подкатегория {i % 35}", f"Вопрос номер {i}?",
         f"Ответ номер {i}.", "средний", "все клиенты", i + 2, vectors[i])
        for i in range(count)
    ]


def load_binary_copy(conn, rows: list[tuple]) -> None:
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE incoming (LIKE bench_templates) ON COMMIT DROP")
        cur.copy_expert("COPY incoming FROM STDIN WITH (FORMAT binary)", _copy_binary(rows, _TEMPLATE_KINDS))
        cur.execute("INSERT INTO bench_templates SELECT * FROM incoming " + UPSERT)
    conn.commit()


def load_pgvector_helpers(conn, rows: list[tuple]) -> None:
    with conn.cursor() as cur:
        execute_values(cur, "INSERT INTO bench_templates VALUES %s " + UPSERT, rows, page_size=500)
    conn.commit()


def read_binary_copy(conn, count: int, dim: int) -> np.ndarray:
    with conn.cursor() as cur:
        out = io.BytesIO()
        cur.copy_expert("COPY (SELECT embedding FROM bench_templates ORDER BY template_id) TO STDOUT WITH (FORMAT binary)", out)
    conn.commit()
    return _parse_vectors(out.getvalue(), count, dim, "bench")


def read_pgvector_helpers(conn, count: int, dim: int) -> np.ndarray:
    with conn.cursor() as cur:
        cur.execute("SELECT embedding FROM bench_templates ORDER BY template_id")
        matrix = np.stack([v.to_numpy() for (v,) in cur.fetchall()])
    conn.commit()
    return matrix


def best(repeat: int, setup, action) -> float:
    times = []
    for _ in range(repeat):
        setup()
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = rows_for(args.rows, args.dim)
    expected = np.stack([r[-1] for r in rows])
    with postgres_server_url() as server, new_database(server) as url:
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute(TABLE)
        conn.commit()
        register_vector(conn)

        def empty() -> None:
            with conn.cursor() as cur:
                cur.execute("TRUNCATE bench_templates")
            conn.commit()

        results = {}
        for name, load, read in (
            ("binary COPY (store codec)", load_binary_copy, read_binary_copy),
            ("pgvector helpers", load_pgvector_helpers, read_pgvector_helpers),
        ):
            load_s = best(args.repeat, empty, lambda load=load: load(conn, rows))
            matrix = read(conn, args.rows, args.dim)
            np.testing.assert_array_equal(matrix, expected)
            read_s = best(args.repeat, lambda: None, lambda read=read: read(conn, args.rows, args.dim))
            results[name] = (load_s, read_s)
        conn.close()
    print(f"{args.rows} rows x {args.dim} dimensions, best of {args.repeat}")
    print(f"{'method':28} {'load s':>8} {'read s':>8}")
    for name, (load_s, read_s) in results.items():
        print(f"{name:28} {load_s:8.3f} {read_s:8.3f}")


if __name__ == "__main__":
    main()
