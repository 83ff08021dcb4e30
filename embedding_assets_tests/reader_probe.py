"""A separate reader process: reload and search a store in a loop, writing what it saw as JSON lines.

    python -m embedding_assets_tests.reader_probe STORE_URL OUT_FILE STOP_FILE [--mode memory|database]

Each line is {"generation", "model_version", "hits": [[template_id, answer], ...]} for a search
that returns every template, or {"error": "..."}. Each line goes out in one unbuffered write; a
reader of the file takes only complete lines (`complete_lines`), as a line may still be landing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from embedding_assets.retrieval import StaleIndexError, TemplateRetriever

QUERY = "Как заблокировать карту, если её украли?"


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of a file another process is appending to (none if it is absent)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()


def write_line(out, record: dict) -> None:
    out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("out", type=Path)
    parser.add_argument("stop", type=Path)
    parser.add_argument("--mode", default=None)
    args = parser.parse_args()
    extra = {"mode": args.mode} if args.mode else {}
    retriever = TemplateRetriever.load(args.store, **extra)
    with args.out.open("wb", buffering=0) as out:
        write_line(out, {"ready": True})
        while not args.stop.exists():
            try:
                retriever.reload_if_changed()
                index = retriever.index
                try:
                    result = index.search(QUERY, top_k=10_000)
                except StaleIndexError:  # database mode: the store moved on during the search; reload
                    continue
                record = {
                    "generation": result.identity.store_generation,
                    "model_version": result.identity.model_version,
                    "rows": len(index),
                    "hits": [[h.template_id, h.answer] for h in result.hits],
                }
            except Exception as exc:  # every error is a finding: recorded, never hidden
                record = {"error": f"{type(exc).__name__}: {exc}"}
            write_line(out, record)
            time.sleep(0.002)


if __name__ == "__main__":
    main()
