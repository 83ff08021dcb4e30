"""A reader process searching while 100 publishes land: it only ever sees one whole generation."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import PROJECT_ROOT, make_template
from embedding_assets_tests.reader_probe import complete_lines
from embedding_assets_tests.reliability import BACKENDS, record_figure
from embedding_assets_tests.secrets_scan import no_secrets_in_outputs  # noqa: F401  (autouse)

pytestmark = pytest.mark.reliability

PUBLISHES = 100
STABLE = 10
VERSION = ModelVersion(key="e5-small-v1", provider="local", model="multilingual-e5-small", dimension=384,
                       settings={"variant": "original"})


READERS = [(backend, "memory") for backend in BACKENDS] + [("postgres", "database")]


@pytest.fixture(params=READERS, ids=[f"{backend}-{mode}" for backend, mode in READERS])
def reader(request) -> tuple[str, str]:
    """A store URL and the search mode of the reader process."""
    backend, mode = request.param
    return request.getfixturevalue(f"{backend}_store_url"), mode


def vector_of(content_hash: str) -> np.ndarray:
    """A fixed unit vector per text: the readers check rows and generations, not ranking quality."""
    rng = np.random.default_rng(int(hashlib.sha256(content_hash.encode()).hexdigest()[:16], 16))
    vector = rng.normal(size=VERSION.dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


def publish(store, templates) -> int:
    info, published = store.published(VERSION.key)
    plan = build_change_plan(
        hash_templates(templates, VERSION.text_template), published,
        model_version=VERSION.key, base_generation=info.generation if info else None,
    )
    vectors = {i.content_hash: vector_of(i.content_hash) for i in (*plan.new, *plan.modified)}
    return store.publish(VERSION, plan, vectors).generation


def sheets(seed: int = 7):
    """The first sheet, then PUBLISHES edits of it: each adds one template, edits two, deletes one."""
    rng = np.random.default_rng(seed)
    current = {n: make_template(n) for n in range(1, 41)}
    yield list(current.values())
    for step in range(1, PUBLISHES + 1):
        new = 1000 + step
        current[new] = make_template(new)
        for n in rng.choice(sorted(current), size=2, replace=False):
            current[n] = make_template(n, answer=f"{current[n].answer} Правка {step}.")
        deletable = sorted(n for n in current if n > STABLE and n != new)
        del current[int(rng.choice(deletable))]
        yield list(current.values())


def _wait_for_a_search(out: Path, reader: subprocess.Popen, timeout: float = 2.0) -> None:
    """Pace the publishes on the reader, so it searches between most of them (it may still miss some)."""
    lines = len(complete_lines(out))
    deadline = time.monotonic() + timeout
    while len(complete_lines(out)) == lines and time.monotonic() < deadline:
        assert reader.poll() is None, "the reader process exited"
        time.sleep(0.005)


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    """A reader of the probe's file stops at the last newline, even inside a multi-byte character."""
    out = tmp_path / "reader.jsonl"
    whole = json.dumps({"generation": 1, "hits": [["T-1", "Ответ"]]}, ensure_ascii=False) + "\n"
    half = json.dumps({"generation": 2, "hits": [["T-1", "Ответ"]]}, ensure_ascii=False).encode("utf-8")
    out.write_bytes(whole.encode("utf-8") + half[: half.index("Ответ".encode("utf-8")) + 1])
    with pytest.raises(UnicodeDecodeError):
        out.read_text(encoding="utf-8")
    assert complete_lines(out) == [whole.rstrip("\n")]
    assert complete_lines(tmp_path / "absent.jsonl") == []


def test_a_reader_process_sees_only_whole_generations_during_100_publishes(reader, tmp_path: Path) -> None:
    store_url, mode = reader
    states: dict[int, dict[str, str]] = {}
    sheet_iter = sheets()
    with open_store(store_url) as store:
        first = next(sheet_iter)
        states[publish(store, first)] = {t.template_id: t.answer for t in first}
        out, stop = tmp_path / "reader.jsonl", tmp_path / "stop"
        reader = subprocess.Popen(
            [sys.executable, "-m", "embedding_assets_tests.reader_probe", store_url, str(out), str(stop),
             "--mode", mode],
            cwd=PROJECT_ROOT,
        )
        try:
            deadline = time.monotonic() + 120
            while not complete_lines(out) and time.monotonic() < deadline:
                assert reader.poll() is None, "the reader process exited before it was ready"
                time.sleep(0.05)
            for sheet in sheet_iter:
                states[publish(store, sheet)] = {t.template_id: t.answer for t in sheet}
                _wait_for_a_search(out, reader)
            final = f'"generation": {max(states)},'
            deadline = time.monotonic() + 60
            while not any(final in line for line in complete_lines(out)) and time.monotonic() < deadline:
                assert reader.poll() is None, "the reader process exited"
                time.sleep(0.02)
        finally:
            stop.touch()
            reader.wait(timeout=60)

    records = [json.loads(line) for line in complete_lines(out)[1:]]
    errors = [r["error"] for r in records if "error" in r]
    seen = [r for r in records if "error" not in r]
    mixed = [r["generation"] for r in seen if dict(r["hits"]) != states[r["generation"]]]
    generations = [r["generation"] for r in seen]
    stable_ids = {f"T-{n}" for n in range(1, STABLE + 1)}
    missing_stable = [r["generation"] for r in seen if not stable_ids <= {tid for tid, _ in r["hits"]}]

    assert len(states) == PUBLISHES + 1
    assert errors == []
    assert mixed == []
    assert missing_stable == []
    assert all(len(r["hits"]) == r["rows"] == len(states[r["generation"]]) for r in seen)
    assert generations == sorted(generations)
    assert generations[-1] == max(states)
    assert len(set(generations)) >= PUBLISHES // 2, f"the reader saw only generations {sorted(set(generations))}"
    record_figure(
        f"concurrent readers ({store_url.split(':')[0]}, {mode} mode)",
        f"{PUBLISHES} publishes (adds, edits, deletes); a reader process made {len(seen)} searches over "
        f"{len(set(generations))} generations: errors 0, mixed generations 0, missing templates 0",
    )
