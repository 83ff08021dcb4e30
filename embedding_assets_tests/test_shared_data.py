"""Tests that need the shared bank FAQ skip with the reason outside CI and fail under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedding_assets_tests.conftest import PROJECT_ROOT, SHARED_VAR

NEEDS_SHARED_DATA = "embedding_assets_tests/test_faq.py::test_vtb_faq_parses"


def run_without_shared_data(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, SHARED_VAR: str(tmp_path / "nowhere"), "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", NEEDS_SHARED_DATA, "-q", "-rsE", "-p", "no:cacheprovider"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(("ci", "outcome", "returncode"), [("", "1 skipped", 0), ("true", "1 error", 1)])
def test_missing_shared_data_skips_outside_ci_and_fails_in_ci(tmp_path: Path, ci: str, outcome: str, returncode: int) -> None:
    done = run_without_shared_data(tmp_path, ci)
    missing = tmp_path / "nowhere" / "datasets" / "vtb_belarus_faq" / "smart_support_vtb_belarus_faq_final.xlsx"
    assert done.returncode == returncode, done.stdout
    assert outcome in done.stdout.splitlines()[-1]
    assert f"shared data set missing: {missing} (set {SHARED_VAR} to the folder holding datasets/)" in done.stdout
