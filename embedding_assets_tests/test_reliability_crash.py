"""SIGKILL in the middle of a run or of a publish: the store is always the old or the new whole
version, and a rerun pays only for the texts that were not embedded yet."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest

from embedding_assets.lib.faq import parse_faq
from embedding_assets.lib.hashing import content_hash, hash_templates
from embedding_assets.lib.model_versions import ModelVersion, load_model_versions
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, make_template, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer, Reply, fake_vector
from embedding_assets_tests.pipeline import KEY, run_pipeline
from embedding_assets_tests.reliability import BACKENDS, record_figure
from embedding_assets_tests.secrets_scan import no_secrets_in_outputs  # noqa: F401  (autouse)

pytestmark = pytest.mark.reliability

TRIALS = 20
FIELDS = ("category", "subcategory", "question", "answer", "priority", "audience")
DIMENSION = 8
FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=BACKENDS)
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


@pytest.fixture(scope="module")
def server():
    started = FaultServer(dimension=DIMENSION).start()
    yield started
    started.stop()


def _versions(path, base_url: str):
    path.write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = {DIMENSION}\n'
        f'batch_size = 4\nsettings = {{ base_url = "{base_url}", concurrency = 1, max_attempts = 2, '
        "backoff_initial = 0.01, backoff_max = 0.02, timeout = 5 }\n",
        encoding="utf-8",
    )
    return path


def _state(store_url: str, version: ModelVersion) -> dict[str, tuple[str, str]]:
    """Published template id -> (content hash, answer); every vector checked against its text."""
    with open_store(store_url) as store:
        info = store.version(version.key)
        if info is None:
            return {}
        snapshot = store.snapshot(version.key)
    texts = {}
    for position, template in enumerate(snapshot.templates):
        text = version.text_template.format(**{f: getattr(template, f) for f in FIELDS})
        assert content_hash(text) == template.content_hash
        np.testing.assert_allclose(snapshot.matrix[position], fake_vector(text, DIMENSION), atol=1e-6)
        texts[template.template_id] = (template.content_hash, template.answer)
    return texts


def _sheet_state(faq, version: ModelVersion) -> dict[str, tuple[str, str]]:
    return {
        h.template.template_id: (h.content_hash, h.template.answer)
        for h in hash_templates(parse_faq(faq), version.text_template)
    }


def _still_to_embed(store_url: str, faq, version: ModelVersion) -> list[str]:
    """Texts the next run must send: changed against the published store and not in the cache."""
    with open_store(store_url) as store:
        info, published = store.published(version.key)
        plan = build_change_plan(
            hash_templates(parse_faq(faq), version.text_template), published,
            model_version=version.key, base_generation=info.generation if info else None,
        )
        needed = plan.texts_to_embed()
        cached = store.cache(version).get(list(needed))
    return sorted(text for content_hash, text in needed.items() if content_hash not in cached)


def _edit(rows: list[list], trial: int, rng: np.random.Generator) -> list[list]:
    """Modify eight answers, add two templates, delete one."""
    header, body = rows[0], [list(r) for r in rows[1:]]
    for i in rng.choice(len(body), size=8, replace=False):
        body[i][6] = f"{body[i][6]} Уточнение {trial}."
    for n in range(2):
        body.append([f"CRASH-{trial}-{n}", "Карты", "Проверка", f"Вопрос проверки {trial}-{n}?", "низкий",
                     "все клиенты", f"Ответ проверки {trial}-{n}."])
    del body[int(rng.integers(len(body) - 2))]
    return [header, *body]


def _materialize_in_child(faq, store_url: str, versions) -> int:
    outcome = run_pipeline(faq, store_url, model_versions=versions)
    return 0 if outcome.result.success else 1


def _run_child(target, *args) -> multiprocessing.Process:
    process = FORK.Process(target=target, args=args)
    process.start()
    return process


def test_sigkill_during_runs_leaves_old_or_new_and_a_rerun_pays_only_what_is_missing(
    store_url: str, server: FaultServer, tmp_path
) -> None:
    versions = _versions(tmp_path / "versions.toml", server.base_url)
    (version,) = load_model_versions(versions)
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    server.reset(fallback=Reply(delay=0.03))
    started = time.monotonic()
    assert run_pipeline(faq, store_url, model_versions=versions).result.success
    full_run = time.monotonic() - started
    rng = np.random.default_rng(20261121)
    rows = read_rows(faq)
    outcomes = {"old": 0, "new": 0}
    paid_twice = 0

    for trial in range(TRIALS):
        old = _state(store_url, version)
        rows = _edit(rows, trial, rng)
        write_rows(faq, rows)
        new = _sheet_state(faq, version)
        to_embed = _still_to_embed(store_url, faq, version)
        server.reset(fallback=Reply(delay=0.03))

        child = _run_child(_materialize_in_child, faq, store_url, versions)
        time.sleep(rng.uniform(0.0, full_run * 0.6))
        child.kill()
        child.join()

        after_kill = _state(store_url, version)
        assert after_kill in (old, new), f"trial {trial}: the store is neither the old nor the new version"
        outcomes["old" if after_kill == old else "new"] += 1
        sent_before_kill = list(server.inputs)
        missing = _still_to_embed(store_url, faq, version)
        assert set(missing) <= set(to_embed)

        server.reset()
        assert run_pipeline(faq, store_url, model_versions=versions).result.success
        assert sorted(server.inputs) == missing, f"trial {trial}: the rerun sent other texts than the missing ones"
        assert _state(store_url, version) == new
        paid_twice += len(set(sent_before_kill) & set(server.inputs))

    record_figure(
        f"crash during runs ({store_url.split(':')[0]})",
        f"{TRIALS} SIGKILLs at random times: store old {outcomes['old']}, new {outcomes['new']}, mixed 0; "
        f"rows lost 0, duplicates 0; texts sent again after a kill: {paid_twice} (requests in flight)",
    )


# --- a kill inside the publish transaction --------------------------------------------------------

BIG = ModelVersion(key="big-v1", provider="local", model="synthetic", dimension=256)


# Rows of the publish a trial kills, so that it lasts about a second: PostgreSQL also inserts each
# rewritten row into the version's HNSW index (about 2 ms a row on two cores).
BIG_ROWS = {"sqlite": 3000, "postgresql": 600}


def _big_sheet(generation: int, rows: int):
    return [make_template(n, answer=f"Ответ {n}, версия {generation}.") for n in range(1, rows + 1)]


def _vectors_for(plan) -> dict[str, np.ndarray]:
    return {i.content_hash: fake_vector(i.content_hash, BIG.dimension) for i in (*plan.new, *plan.modified)}


def _publish(store, generation: int, rows: int, ready=None) -> float:
    """Publish the big sheet of `generation`; the seconds the publish transaction took."""
    info, published = store.published(BIG.key)
    plan = build_change_plan(
        hash_templates(_big_sheet(generation, rows), BIG.text_template), published,
        model_version=BIG.key, base_generation=info.generation if info else None,
    )
    vectors = _vectors_for(plan)
    if ready is not None:
        ready.set()
    started = time.monotonic()
    store.publish(BIG, plan, vectors)
    return time.monotonic() - started


def _publish_in_child(store_url: str, generation: int, rows: int, ready) -> None:
    with open_store(store_url) as store:
        _publish(store, generation, rows, ready)
    os._exit(0)


def _big_state(store_url: str) -> tuple[int, list[tuple[str, str]], bytes]:
    with open_store(store_url) as store:
        snapshot = store.snapshot(BIG.key)
    return snapshot.version.generation, [(t.template_id, t.answer) for t in snapshot.templates], snapshot.matrix.tobytes()


def test_sigkill_inside_the_publish_transaction_leaves_old_or_new(store_url: str) -> None:
    backend = store_url.split(":")[0]
    rows = BIG_ROWS[backend]
    with open_store(store_url) as store:
        _publish(store, 0, rows)
    # Timed as a trial runs it: a new process rewriting every row (the first publish only inserted them).
    ready = FORK.Event()
    child = _run_child(_publish_in_child, store_url, TRIALS + 1, rows, ready)
    assert ready.wait(60)
    started = time.monotonic()
    child.join()
    publish_time = time.monotonic() - started
    assert child.exitcode == 0
    rng = np.random.default_rng(7)
    outcomes = {"old": 0, "new": 0}
    for trial in range(1, TRIALS + 1):
        old = _big_state(store_url)
        ready = FORK.Event()
        child = _run_child(_publish_in_child, store_url, trial, rows, ready)
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, publish_time * 1.2))
        child.kill()
        child.join()
        after = _big_state(store_url)
        if after == old:
            outcomes["old"] += 1
            child = _run_child(_publish_in_child, store_url, trial, rows, FORK.Event())
            child.join()
            assert child.exitcode == 0
            after = _big_state(store_url)
        else:
            outcomes["new"] += 1
        expected = [(t.template_id, t.answer) for t in sorted(_big_sheet(trial, rows), key=lambda t: t.template_id)]
        assert after[1] == expected
        assert after[0] > old[0]
    record_figure(
        f"crash inside publish ({backend})",
        f"{TRIALS} SIGKILLs during a {rows}-row publish transaction ({publish_time * 1000:.0f} ms): "
        f"store old {outcomes['old']}, new {outcomes['new']}, mixed 0",
    )
