"""What `materialize` reports when a run fails: the truth about the store, the error's own message, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedding_assets.store import open_store
from embedding_assets_tests.conftest import cli_project
from embedding_assets_tests.openai_servers import FaultServer, Reply

CLI = str(Path(sys.executable).parent / "embedding-assets")
KEY = "fake-v1"
TEMPLATES = 90
BATCH = 10


@pytest.fixture
def server():
    running = FaultServer(dimension=8).start()
    yield running
    running.stop()


@pytest.fixture
def project(tmp_path, server):
    """A FAQ copy, an `openai` model version on the fault server, a store path and a DAGSTER_HOME."""
    return cli_project(
        tmp_path,
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = 8\n'
        f'batch_size = {BATCH}\nsettings = {{ base_url = "{server.base_url}", concurrency = 1, max_attempts = 1, '
        "timeout = 30 }\n",
    )


def materialize(project, *args: str) -> subprocess.CompletedProcess:
    cwd, env = project
    return subprocess.run([CLI, "materialize", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def store_generation(project) -> int:
    cwd, _ = project
    with open_store(cwd / "store.db", create=False) as store:
        return store.version(KEY).generation


def test_a_failure_after_the_publish_reports_the_published_generation(project, server):
    passage_requests = TEMPLATES // BATCH
    # Passages succeed; every later request (the retrieval_quality check's queries) is refused.
    server.reset(*[Reply()] * passage_requests, fallback=Reply(status=400))

    done = materialize(project)

    generation = store_generation(project)
    assert generation == 1
    output = done.stdout + done.stderr
    assert re.search(rf"^{KEY}: .*published generation {generation}\b", output, re.MULTILINE), output
    assert "the published store is unchanged" not in output
    if done.returncode != 0:  # the check's error failed the run after the publish
        assert done.returncode == 3
        assert "step embedding_store_checks failed: " in done.stderr
        assert "scripted failure 400" in done.stderr


def test_json_failure_after_the_publish_is_one_object_with_the_error_and_the_publish(project, server):
    server.reset(*[Reply()] * (TEMPLATES // BATCH), fallback=Reply(status=400))

    done = materialize(project, "--json")

    report = json.loads(done.stdout)
    assert report["model_version"] == KEY
    assert report["generation"] == store_generation(project) == 1
    assert report["published"] is True
    if done.returncode != 0:
        assert done.returncode == 3
        assert report["success"] is False
        assert [f["step"] for f in report["errors"]] == ["embedding_store_checks"]
        assert "scripted failure 400" in report["errors"][0]["message"]
        assert f"{KEY}: published generation 1 is live; a step after the publish failed" in done.stderr


def test_json_failure_before_the_publish_says_nothing_was_published(project, server):
    server.reset(fallback=Reply(status=400))  # the first passage batch is refused

    done = materialize(project, "--json")

    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["success"] is False
    assert report["published"] is False
    assert report["generation"] is None
    [error] = report["errors"]
    assert error["step"] == "template_embeddings"
    assert "scripted failure 400" in error["message"]
    assert not (project[0] / "store.db").exists() or store_generation_or_none(project) is None
    assert done.stderr.splitlines() == [f"{KEY}: step template_embeddings failed: {error['message']}",
                                        f"{KEY}: the published store is unchanged (run {report['run_id']})"]


def store_generation_or_none(project) -> int | None:
    cwd, _ = project
    with open_store(cwd / "store.db", create=False) as store:
        version = store.version(KEY)
        return version.generation if version else None


def test_help_documents_the_exit_codes_and_a_usage_error_exits_2(project):
    cwd, env = project
    shown = subprocess.run([CLI, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert "Exit codes:" in shown.stdout
    for line in ("0  success", "1  the command failed; a failed `materialize` run published nothing",
                 "2  usage error", "3  `materialize` published a new generation, then a later step"):
        assert line in shown.stdout
    unknown = subprocess.run([CLI, "materialize", "--no-such-option"], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=60)
    assert unknown.returncode == 2
    assert "No such option '--no-such-option'" in unknown.stderr


def test_the_reported_cost_counts_every_request_the_run_sent_the_checks_queries_included(project, server):
    server.reset(fallback=Reply())

    done = materialize(project, "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    sent = len(server.requests)
    passages = TEMPLATES // BATCH
    assert sent > passages  # the retrieval_quality check embedded its queries through the same API
    assert (report["requests"], report["check_requests"]) == (sent, sent - passages)
    assert report["inputs"] == len(server.inputs)
