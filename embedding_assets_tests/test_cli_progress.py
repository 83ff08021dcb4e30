"""`materialize` shows embedding progress: plain lines off a terminal, a bar on one, nothing extra with --json."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import dagster as dg

from embedding_assets_tests.test_cli_reporting import BATCH, CLI, KEY, TEMPLATES, project, server  # noqa: F401

BATCHES = TEMPLATES // BATCH


def materialize(project, *args: str) -> subprocess.CompletedProcess:
    cwd, env = project
    return subprocess.run([CLI, "materialize", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(rf"{KEY}: embedded \d+ of", line)]


def test_a_first_build_off_a_terminal_prints_one_plain_line_per_batch_and_logs_them(project):
    done = materialize(project)
    assert done.returncode == 0, done.stderr

    lines = progress_lines(done.stdout)
    assert len(lines) == BATCHES
    for number, line in enumerate(lines, start=1):
        assert line.startswith(
            f"{KEY}: embedded {number * BATCH} of {TEMPLATES} text(s), batch {number} of {BATCHES}, "
        ), line
        assert re.search(r"[\d.]+ texts/s, ETA (\d+ s|\?)$", line), line
    assert lines[-1].endswith("ETA 0 s")

    cwd, env = project
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            [run] = instance.get_runs()
            logged = [e.user_message for e in instance.all_logs(run.run_id) if e.user_message.startswith(f"{KEY}: embedded ")]
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous
    assert logged == lines

    noop = materialize(project)
    assert noop.returncode == 0, noop.stderr
    assert progress_lines(noop.stdout) == []


def test_json_output_is_one_json_document_without_progress(project):
    done = materialize(project, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["embedded"], report["generation"]) == (TEMPLATES, 1)
    assert done.stderr == ""


def test_on_a_terminal_a_progress_bar_shows_texts_batches_rate_and_eta(project):
    cwd, env = project
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns: the whole bar fits
    process = subprocess.Popen([CLI, "materialize"], cwd=cwd, env={**env, "COLUMNS": "160"},
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif process.poll() is not None:
            break
    assert process.wait(timeout=60) == 0
    os.close(leader)
    text = screen.decode("utf-8", "replace")
    assert "\r" in text  # the bar redraws in place
    assert re.search(rf"{KEY}: embedding: 100%.*{TEMPLATES}/{TEMPLATES} \[\d\d:\d\d<00:00, +[\d.]+(text/s|s/text), "
                     rf"batch {BATCHES} of {BATCHES}\]", text), text[-2000:]
    assert progress_lines(text) == []  # no plain lines on a terminal
    assert f"{KEY}: 90 new, 0 modified" in text
