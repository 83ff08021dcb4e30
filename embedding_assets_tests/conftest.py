from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

# The local model's OpenMP threads sleep between calls instead of spinning (as the CLI and the service
# set it), and the worker processes share the cores instead of each starting a thread per core; set
# before anything loads the model, and inherited by the processes the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

import dagster as dg

import pytest
from openpyxl import Workbook, load_workbook

from embedding_assets.lib.faq import Template
from embedding_assets_tests.pipeline import DEFAULT_KEY, run_pipeline
from embedding_assets_tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FAQ = PROJECT_ROOT / "data" / "faq.xlsx"
SAMPLE_QUERIES = PROJECT_ROOT / "data" / "validation_queries.json"
SHARED_VAR = "EMBEDDING_ASSETS_SHARED"
SHARED_ROOT = Path(os.environ.get(SHARED_VAR) or PROJECT_ROOT.parent / "shared")
SHARED_DATASET = SHARED_ROOT / "datasets" / "vtb_belarus_faq"
VTB_FAQ = SHARED_DATASET / "smart_support_vtb_belarus_faq_final.xlsx"
VTB_QUERIES = SHARED_DATASET / "retrieval_validation_v2.json"
HEADER = ["ID", "Основная категория", "Подкатегория", "Пример вопроса", "Приоритет", "Целевая аудитория", "Шаблонный ответ"]


def read_rows(path: Path) -> list[list]:
    """All rows of the first sheet, header included."""
    sheet = load_workbook(path).worksheets[0]
    return [list(row) for row in sheet.iter_rows(values_only=True)]


def write_rows(path: Path, rows: list[list]) -> Path:
    """Write rows (header first) to a one-sheet workbook."""
    book = Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def make_template(n: int, **changes: object) -> Template:
    """A small hand-made template; keyword arguments override its fields."""
    base = Template(
        template_id=f"T-{n}",
        category="Карты",
        subcategory=f"Подкатегория {n}",
        question=f"Вопрос номер {n}?",
        answer=f"Ответ номер {n}.",
        priority="высокий",
        audience="все клиенты",
        source_row=n + 1,
    )
    return replace(base, **changes)


def cli_project(directory: Path, versions_toml: str) -> tuple[Path, dict[str, str]]:
    """A working directory for the CLI: a copy of the sample FAQ, `versions_toml` as its model versions
    file, a store path and a DAGSTER_HOME; the directory and the environment to run the CLI with."""
    write_rows(directory / "faq.xlsx", read_rows(SAMPLE_FAQ))
    versions = directory / "model_versions.toml"
    versions.write_text(versions_toml, encoding="utf-8")
    return directory, {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(directory / "faq.xlsx"),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{directory / 'store.db'}",
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(versions),
        "DAGSTER_HOME": str(directory / "dagster_home"),
        "OPENAI_API_KEY": "test-key",
    }


@pytest.fixture
def faq_copy(tmp_path: Path) -> Path:
    """A temp copy of the sample FAQ that a test may edit."""
    return write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def shared_data(path: Path) -> Path:
    """A file of the shared data set; when it is missing the test skips, or fails under CI=true."""
    if not path.is_file():
        reason = f"shared data set missing: {path} (set {SHARED_VAR} to the folder holding datasets/)"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def vtb_faq() -> Path:
    """The real 201-template bank FAQ."""
    return shared_data(VTB_FAQ)


@pytest.fixture(scope="session")
def vtb_queries() -> Path:
    """Labelled customer queries for the bank FAQ."""
    return shared_data(VTB_QUERIES)


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """One cold run of the sample FAQ into a new store, shared by the tests that start warm."""
    directory = tmp_path_factory.mktemp("warm")
    faq = write_rows(directory / "faq.xlsx", read_rows(SAMPLE_FAQ))
    store = directory / "store.db"
    instance = dg.DagsterInstance.ephemeral()
    cold = run_pipeline(faq, store, instance=instance)
    rerun = run_pipeline(faq, store, instance=instance)
    return cold, rerun, store


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """One cold run of the sample FAQ for the default model version, for the tests that use the defaults."""
    directory = tmp_path_factory.mktemp("default")
    faq = write_rows(directory / "faq.xlsx", read_rows(SAMPLE_FAQ))
    store = directory / "store.db"
    cold = run_pipeline(faq, store, key=DEFAULT_KEY)
    assert cold.result.success
    return cold, store


@pytest.fixture
def default_warm(default_run, tmp_path):
    """A copy of the default version's published store and of the sample FAQ, for one test to change."""
    store = tmp_path / "store.db"
    shutil.copyfile(default_run[1], store)
    return write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ)), store


@pytest.fixture
def warm(first_run, tmp_path):
    """A copy of the published store (with its cache) and of the sample FAQ, for one test to change."""
    store = tmp_path / "store.db"
    shutil.copyfile(first_run[2], store)
    return write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ)), store


@pytest.fixture
def sqlite_store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


FIGURE_PROPERTY = "reliability figure"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The figures a test recorded travel in its report (from a worker process to the session's summary)."""
    from embedding_assets_tests.reliability import take_figures

    outcome = yield
    if call.when == "call":
        outcome.get_result().user_properties.extend((FIGURE_PROPERTY, figure) for figure in take_figures())


def pytest_terminal_summary(terminalreporter) -> None:
    figures = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == FIGURE_PROPERTY
    ]
    if figures:
        terminalreporter.section("reliability figures")
        for name, text in figures:
            terminalreporter.write_line(f"{name}: {text}")


@pytest.fixture
def postgres_store_url(postgres_url: str) -> str:
    return postgres_url
