"""The service's /docs page works offline (Swagger UI from an installed package, not a CDN), and the
README's curl lines work as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest

from embedding_assets_tests.conftest import PROJECT_ROOT
from embedding_assets_tests.dagster_ui import launch_chromium
from embedding_assets_tests.test_service import Service, running  # noqa: F401  (fixture)

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


class References(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A service with no store yet: the docs do not wait for one."""
    directory = tmp_path_factory.mktemp("docs")
    started = Service(directory / "not-yet.db", directory)
    yield started
    started.stop()


def test_docs_reference_no_external_host_and_every_asset_is_served(service: Service) -> None:
    status, content_type, body = fetch(service.url + "/docs")
    page = body.decode("utf-8")
    assert (status, content_type.split(";")[0]) == (200, "text/html")
    assert re.findall(r"(?:https?:)?//[\w.-]+", page) == []
    parser = References()
    parser.feed(page)
    openapi_url = re.search(r"url: '([^']+)'", page).group(1)
    urls = [*parser.urls, openapi_url]
    assert sorted(urlsplit(url).path.rsplit("/", 1)[-1] for url in urls) == [
        "favicon-32x32.png", "openapi.json", "swagger-ui-bundle.js", "swagger-ui.css",
    ]
    assert all(not urlsplit(url).netloc for url in urls), urls
    kinds = {}
    for url in urls:
        status, content_type, body = fetch(urljoin(service.url + "/docs", url))
        assert status == 200 and body, url
        kinds[url.rsplit("/", 1)[-1]] = content_type.split(";")[0]
    assert kinds == {
        "favicon-32x32.png": "image/png",
        "openapi.json": "application/json",
        "swagger-ui-bundle.js": "text/javascript",
        "swagger-ui.css": "text/css",
    }
    assert fetch(service.url + "/redoc")[0] == 404  # ReDoc would need a CDN
    assert fetch(service.url + "/docs/assets/absent.js")[0] == 404


def test_docs_render_in_chromium_with_no_request_leaving_the_machine(service: Service, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except Exception as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"Chromium cannot start in CI: {exc}")
            pytest.skip(f"Chromium cannot start: {exc}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(service.url + "/docs", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector(".opblock-summary-path", timeout=60_000)
            operations = sorted(
                f"{method.strip()} {path.strip()}"
                for method, path in zip(
                    page.locator(".opblock-summary-method").all_inner_texts(),
                    page.locator(".opblock-summary-path").all_inner_texts(),
                )
            )
            title = page.locator(".info .title").inner_text()
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        finally:
            browser.close()
    assert operations == ["GET /healthz", "GET /readyz", "GET /search", "POST /search"]
    assert title.startswith("FAQ template retrieval")
    assert {urlsplit(url).hostname for url in requested} <= LOCAL_HOSTS, requested


def readme_search_lines() -> list[str]:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^curl -sG http://127\.0\.0\.1:8080/search .+$", readme, re.M)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_lines_return_hits(running) -> None:
    service, _ = running
    lines = readme_search_lines()
    assert len(lines) == 2
    found = []
    for line in lines:
        command = shlex.split(line.replace("http://127.0.0.1:8080", service.url))
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["hits"], line
        found.append((body["query"], len(body["hits"]), body["hits"][0]["template_id"]))
    assert found[0] == ("забыла пин от карточки", 2, "CARD-007")
    assert found[1][:2] == ("украли телефон", 3)
    raw = subprocess.run(["curl", "-s", "-w", " %{http_code}", f"{service.url}/search?query=забыла+пин&top_k=2"],
                         capture_output=True, text=True, timeout=60)
    assert raw.stdout.endswith(" 400")  # why the README encodes the query
