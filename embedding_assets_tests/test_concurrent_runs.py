"""Two `materialize` processes after the same edit, through an OpenAI-compatible server that counts inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.lib.hashing import render_text
from embedding_assets.lib.faq import parse_faq
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer, Reply

CLI = str(Path(sys.executable).parent / "embedding-assets")
KEY = "e5-small-v1"
TEXT_TEMPLATE = "{subcategory}: {question}\n{answer}"
ANSWER = 6
EDITED_ROWS = (2, 9, 40)


@pytest.fixture
def server():
    running = FaultServer(dimension=8).start()
    yield running
    running.stop()


def environment(tmp_path: Path, server: FaultServer, name: str) -> dict:
    versions = tmp_path / "model_versions.toml"
    versions.write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = 8\n'
        f'batch_size = 10\nsettings = {{ base_url = "{server.base_url}", concurrency = 1, max_attempts = 2, '
        "timeout = 30 }\n",
        encoding="utf-8",
    )
    return {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(tmp_path / "faq.xlsx"),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(versions),
        "DAGSTER_HOME": str(tmp_path / name),
        "OPENAI_API_KEY": "test-key",
    }


def run_logs(home: Path) -> list[str]:
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.get() as instance:
            return [entry.user_message for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous


@pytest.mark.parametrize("trial", [1, 2, 3])
def test_two_runs_after_the_same_edit_pay_each_changed_text_once(tmp_path, server, trial):
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    first = subprocess.run([CLI, "materialize", "--json"], cwd=tmp_path, env=environment(tmp_path, server, "home-0"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr

    rows = read_rows(faq)
    for row in EDITED_ROWS:
        rows[row][ANSWER] += f" Уточнение {trial}."
    write_rows(faq, rows)
    edited = {render_text(t, TEXT_TEMPLATE) for t in parse_faq(faq) if t.answer.endswith(f"Уточнение {trial}.")}
    assert len(edited) == 3
    server.reset(fallback=Reply(delay=3.0))  # a slow model: both runs plan before either publishes

    runs = [
        subprocess.Popen([CLI, "materialize", "--json"], cwd=tmp_path, env=environment(tmp_path, server, f"home-{n}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (1, 2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    paid = Counter(text for text in server.inputs if text in edited)
    assert paid == Counter({text: 1 for text in edited})
    assert sorted(s["embedded"] for s in summaries) == [0, 3]
    assert sorted(s["published"] for s in summaries) == [False, True]
    assert {(s["rows"], s["generation"]) for s in summaries} == {(90, 2)}
    with open_store(tmp_path / "store.db", create=False) as store:
        assert len(store.snapshot(KEY)) == 90
    waited = [m for n in (1, 2) for m in run_logs(tmp_path / f"home-{n}") if "waiting up to" in m]
    assert len(waited) <= 1  # the second run waits when both reach the model together
