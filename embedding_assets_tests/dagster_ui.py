"""A real Dagster webserver and daemon in subprocesses, its GraphQL API, and its UI in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from embedding_assets import settings

from embedding_assets_tests.conftest import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAIN = ["faq_templates", "template_hashes", "change_plan", "template_embeddings", "embedding_store"]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DagsterServer:
    """The webserver's address and its GraphQL endpoint."""

    def __init__(self, port: int, logs: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.logs = logs

    def graphql(self, query: str, variables: Mapping | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": dict(variables or {})}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def runs(self, tags: Mapping[str, str]) -> list[dict]:
        data = self.graphql(
            """
            query Runs($filter: RunsFilter) {
              runsOrError(filter: $filter) {
                ... on Runs { results { runId status tags { key value } } }
                ... on PythonError { message }
              }
            }
            """,
            {"filter": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}},
        )
        runs = data["runsOrError"]
        if "results" not in runs:
            raise RuntimeError(runs["message"])
        return [{**r, "tags": {t["key"]: t["value"] for t in r["tags"]}} for r in runs["results"]]

    def wait_for_run(self, tags: Mapping[str, str], deadline: float) -> dict:
        """The run carrying these tags, once it has finished; fails on timeout."""
        while time.monotonic() < deadline:
            runs = self.runs(tags)
            finished = [r for r in runs if r["status"] in {"SUCCESS", "FAILURE", "CANCELED"}]
            if finished:
                return finished[0]
            time.sleep(2)
        raise TimeoutError(f"no finished run with tags {dict(tags)}; daemon log:\n{self.tail('daemon.log')}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def create_instance_storage(home: Path) -> None:
    """Create the instance's SQLite storage before the daemon and the webserver both try to (they race)."""
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.get() as instance:
            instance.get_runs(limit=1)
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous


@contextmanager
def dagster_server(home: Path, env: Mapping[str, str], startup_timeout: float = 180) -> Iterator[DagsterServer]:
    """Start dagster-daemon and dagster-webserver on a free port with their own DAGSTER_HOME, set up as
    `embedding-assets` sets one up (its instance storage)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(settings.instance_yaml(home.resolve()))
    port = free_port()
    full_env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
    commands = {
        "daemon.log": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        "webserver.log": [
            str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port),
        ],
    }
    create_instance_storage(home)
    processes = []
    try:
        for log_name, command in commands.items():
            log = (home / log_name).open("wb")
            processes.append(
                subprocess.Popen(
                    command, cwd=PROJECT_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        server = DagsterServer(port, home)
        deadline = time.monotonic() + startup_timeout
        while True:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited with {process.returncode}:\n"
                        f"{server.tail('daemon.log')}\n{server.tail('webserver.log')}"
                    )
            try:
                server.graphql("{ version }")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"webserver did not answer in {startup_timeout} s:\n{server.tail('webserver.log')}")
                time.sleep(1)
        yield server
    finally:
        for process in processes:
            _stop(process)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def asset_graph(browser, url: str, screenshot: Path, timeout_ms: int = 60_000, scale: float = 1) -> list[str]:
    """Open the asset graph, wait until every asset of the chain is drawn, save a picture of the graph.

    Returns the names of the asset nodes drawn in the graph."""
    page = browser.new_page(viewport={"width": 1900, "height": 900}, device_scale_factor=scale)
    try:
        page.goto(f"{url}/asset-groups/faq_embeddings", wait_until="networkidle", timeout=timeout_ms)
        nodes = page.locator("svg foreignObject [class*='AssetNode_assetName']")
        for name in CHAIN:
            nodes.filter(has_text=name).first.wait_for(timeout=timeout_ms)
        skip = page.get_by_role("button", name="Skip")
        if skip.count():  # the community sign-up dialog shown on a new instance
            skip.first.click()
        loading = page.locator("svg foreignObject").get_by_text("Loading", exact=False)
        deadline = time.monotonic() + timeout_ms / 1000
        while loading.count() and time.monotonic() < deadline:  # node status arrives after the graph
            page.wait_for_timeout(250)
        page.mouse.move(0, 0)  # no hover highlight in the picture
        page.wait_for_timeout(500)
        boxes = [box for box in (page.locator("svg foreignObject").nth(i).bounding_box()
                                 for i in range(page.locator("svg foreignObject").count())) if box]
        left = max(min(b["x"] for b in boxes) - 20, 0)
        top = max(min(b["y"] for b in boxes) + 10, 0)
        right = max(b["x"] + b["width"] for b in boxes) + 20
        bottom = max(b["y"] + b["height"] for b in boxes)
        page.screenshot(path=str(screenshot), clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
        return nodes.all_inner_texts()
    finally:
        page.close()
