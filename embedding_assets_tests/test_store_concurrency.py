"""Concurrent writers on both backends: one writer per model version, each changed text paid once.

Runs go through the store and `embed_with_cache` in two real processes against a counting
OpenAI-compatible server; the Dagster layer holds the same lock around its embedding step.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest

from embedding_assets.lib.embedders import embed_with_cache, embedder_for
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.store import StoreLockedError, open_store
from embedding_assets_tests.conftest import make_template
from embedding_assets_tests.openai_servers import FaultServer, Reply, fake_vector
from embedding_assets_tests.reliability import BACKENDS, record_figure
from embedding_assets_tests.test_store_contract import raw_row_count

pytestmark = pytest.mark.reliability

FORK = multiprocessing.get_context("fork")
DIMENSION = 8
TRIALS = 3
FAQ = [make_template(n) for n in range(1, 31)]


@pytest.fixture(params=BACKENDS)
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


@pytest.fixture(scope="module")
def server():
    started = FaultServer(dimension=DIMENSION).start()
    yield started
    started.stop()


def api_version(base_url: str) -> ModelVersion:
    return ModelVersion(
        key="api-v1", provider="openai", model="fake-embed", dimension=DIMENSION, batch_size=2,
        settings={"base_url": base_url, "concurrency": 1, "max_attempts": 2, "timeout": 10},
    )


def pipeline_run(store_url: str, version: ModelVersion, templates, lock_timeout: float):
    """What one materialize does for a version: plan, embed under the writer lock, publish."""
    with open_store(store_url) as store:
        info, published = store.published(version.key)
        plan = build_change_plan(
            hash_templates(templates, version.text_template), published,
            model_version=version.key, base_generation=info.generation if info else None,
        )
        yield plan
        with store.writer_lock(version.key, timeout=lock_timeout):
            run = embed_with_cache(
                plan.texts_to_embed(), version=version, embedder=embedder_for(version, api_key="test-key"),
                cache=store.cache(version),
            )
        result = store.publish(version, plan, run.vectors)
        yield run, result


def _concurrent_run(store_url: str, version: ModelVersion, templates, barrier, results) -> None:
    try:
        steps = pipeline_run(store_url, version, templates, lock_timeout=60)
        next(steps)
        barrier.wait(30)
        run, result = next(steps)
        results.put(("ok", run.embedded, result.changed, result.generation, result.rows))
    except BaseException as exc:  # noqa: BLE001 - the parent asserts on what each run reports
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    results.close()
    results.join_thread()
    os._exit(0)


def test_two_concurrent_runs_after_an_edit_pay_each_changed_text_once(store_url: str, server: FaultServer) -> None:
    version = api_version(server.base_url)
    server.reset()
    for _ in pipeline_run(store_url, version, FAQ, lock_timeout=5):
        pass
    faq = FAQ
    waits = []
    for trial in range(1, TRIALS + 1):
        edited = {f"T-{n}" for n in (trial, trial + 10, trial + 20)}
        faq = [replace(t, answer=f"{t.answer} Правка {trial}.") if t.template_id in edited else t for t in faq]
        server.reset(fallback=Reply(delay=0.4))
        with open_store(store_url) as store:
            generation = store.generation()
        barrier, results = FORK.Barrier(2), FORK.Queue()
        started = time.monotonic()
        children = [FORK.Process(target=_concurrent_run, args=(store_url, version, faq, barrier, results))
                    for _ in range(2)]
        for child in children:
            child.start()
        outcomes = sorted(results.get(timeout=120) for _ in children)
        for child in children:
            child.join(30)
        waits.append(time.monotonic() - started)

        assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
        assert sorted(o[1] for o in outcomes) == [0, 3]
        assert sorted(o[2] for o in outcomes) == [False, True]
        assert [o[3:] for o in outcomes] == [(generation + 1, 30)] * 2
        changed_texts = sorted(h.text for h in hash_templates(faq, version.text_template) if h.template_id in edited)
        assert sorted(server.inputs) == changed_texts
        with open_store(store_url, create=False) as store:
            snapshot = store.snapshot(version.key)
            assert raw_row_count(store, version.key) == 30
        assert [(t.template_id, t.answer) for t in snapshot.templates] == sorted(
            (t.template_id, t.answer) for t in faq
        )
        texts = {h.template_id: h.text for h in hash_templates(faq, version.text_template)}
        expected = np.stack([fake_vector(texts[t.template_id], DIMENSION) for t in snapshot.templates])
        np.testing.assert_allclose(snapshot.matrix, expected, atol=1e-6)
    record_figure(
        f"concurrent runs ({store_url.split(':')[0]})",
        f"{TRIALS} trials of two concurrent runs after editing 3 answers: inputs paid 3 per trial, 30 rows, "
        f"0 duplicates, 0 failures; both done in {min(waits):.1f}-{max(waits):.1f} s",
    )


def _hold(store_url: str, key: str, seconds: float, held) -> None:
    with open_store(store_url) as store, store.writer_lock(key, timeout=5):
        held.set()
        time.sleep(seconds)
    os._exit(0)


def test_the_writer_lock_is_one_holder_per_version_waits_bounded_and_dies_with_its_holder(store_url: str) -> None:
    held = FORK.Event()
    holder = FORK.Process(target=_hold, args=(store_url, "api-v1", 60, held))
    holder.start()
    try:
        assert held.wait(30)
        with open_store(store_url) as store:
            started = time.monotonic()
            with pytest.raises(StoreLockedError) as exc_info:
                with store.writer_lock("api-v1", timeout=0.5):
                    pass
            assert time.monotonic() - started >= 0.5
            message = str(exc_info.value)
            assert message.startswith(f"{store.location}: model version 'api-v1' is being written by another run")
            assert "waited 0.5 s" in message
            with store.writer_lock("other-v1", timeout=0.5):
                pass
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(10)
            started = time.monotonic()
            with store.writer_lock("api-v1", timeout=10):
                acquired_after = time.monotonic() - started
            assert acquired_after < 5
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()


def test_a_second_writer_waits_for_the_first_then_holds_the_lock(store_url: str) -> None:
    held = FORK.Event()
    holder = FORK.Process(target=_hold, args=(store_url, "api-v1", 1.5, held))
    holder.start()
    try:
        assert held.wait(30)
        with open_store(store_url) as store:
            started = time.monotonic()
            with store.writer_lock("api-v1", timeout=30):
                waited = time.monotonic() - started
        assert 0.5 < waited < 25
    finally:
        holder.join(30)
