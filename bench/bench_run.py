"""One run of the embedding chain in process at N templates: first build, no-op, 1% change.

Provider "openai" against a local OpenAI-compatible server that answers instantly, so the figures are
the pipeline's own cost. Next to each no-op: the floor measured in the same run (read the sheet, hash
every text, read the published hashes). Also the bytes a no-op leaves in DAGSTER_HOME and peak RSS.

Run: `.venv/bin/python bench/bench_run.py [N ...]` (default 2000 20000). Nothing is asserted.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import xlsxwriter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.defs.resources import (  # noqa: E402
    EmbeddingStoreIOManager,
    FaqWorkbook,
    IntermediateIOManager,
    ModelCatalog,
    StoreResource,
    ValidationQueries,
)
from embedding_assets.lib.faq import parse_faq  # noqa: E402
from embedding_assets.lib.hashing import hash_templates  # noqa: E402
from embedding_assets.lib.model_versions import ModelVersionCatalog  # noqa: E402
from embedding_assets.store import open_store  # noqa: E402
from embedding_assets_tests.conftest import SAMPLE_FAQ, SAMPLE_QUERIES, read_rows  # noqa: E402
from embedding_assets_tests.openai_servers import FaultServer  # noqa: E402
from embedding_assets_tests.pipeline import KEY, chain, store_checks  # noqa: E402

DIMENSION = 384


def write_faq(path: Path, size: int, changed_every: int | None = None) -> Path:
    header, *rows = read_rows(SAMPLE_FAQ)
    book = xlsxwriter.Workbook(str(path))
    sheet = book.add_worksheet()
    sheet.write_row(0, 0, header)
    for n in range(size):
        row = rows[n % len(rows)]
        answer = f"{row[6]} Номер {n}."
        if changed_every and n % changed_every == 0:
            answer += " Обновлено."
        sheet.write_row(n + 1, 0, [f"GEN-{n:06d}", row[1], row[2], f"{row[3]} (вариант {n})", *row[4:6], answer])
    book.close()
    return path


def write_versions(path: Path, base_url: str) -> Path:
    path.write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "instant"\ndimension = {DIMENSION}\n'
        "batch_size = 256\n"
        f'settings = {{ base_url = "{base_url}", concurrency = 4 }}\n',
        encoding="utf-8",
    )
    return path


def home_bytes(home: Path) -> int:
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file())


def timed_run(assets, resources, instance) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    result = dg.materialize(assets, partition_key=KEY, instance=instance, resources=resources, raise_on_error=False)
    seconds = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"run failed: {result.get_step_failure_events()[0].event_specific_data.error.message}")
    steps = {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(result.run_id)}
    return seconds, steps


def floor_seconds(faq: Path, store: Path, versions: Path) -> float:
    text_template = ModelVersionCatalog.load(versions).get(KEY).text_template
    started = time.perf_counter()
    hash_templates(parse_faq(faq), text_template)
    with open_store(store, create=False) as opened:
        opened.published(KEY)
    return time.perf_counter() - started


def bench(size: int, server: FaultServer, directory: Path) -> None:
    faq = write_faq(directory / "faq.xlsx", size)
    changed = write_faq(directory / "faq-1pct.xlsx", size, changed_every=100)
    store = directory / "store.db"
    versions = write_versions(directory / "versions.toml", server.base_url)
    assets = [*chain(versions), *store_checks()]

    def resources(path: Path) -> dict:
        return {
            "faq": FaqWorkbook(path=str(path)),
            "models": ModelCatalog(config_path=str(versions)),
            "store": StoreResource(url=str(store)),
            "store_io_manager": EmbeddingStoreIOManager(url=str(store)),
            "io_manager": IntermediateIOManager(),
            "validation_queries": ValidationQueries(path=str(SAMPLE_QUERIES)),
        }

    (directory / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(directory / "home")) as instance:
        home = directory / "home"
        cold, _ = timed_run(assets, resources(faq), instance)
        timed_run(assets, resources(faq), instance)  # the first no-op records its all-unchanged plan
        server.reset()
        before = home_bytes(home)
        no_op, no_op_steps = timed_run(assets, resources(faq), instance)
        grown = home_bytes(home) - before
        no_op_requests = len(server.requests)
        server.reset()
        one_pct, one_pct_steps = timed_run(assets, resources(changed), instance)
        one_pct_inputs = len(server.inputs)
    floor = floor_seconds(faq, store, versions)
    checks = sum(v for k, v in no_op_steps.items() if k.startswith("embedding_store_") or k.endswith("_faq_content"))
    print(f"\n## {size:,} templates")
    print("| run | ours (s) | floor (s) |")
    print("|---|---|---|")
    print(f"| first build | {cold:.2f} | |")
    print(f"| no-op | {no_op:.2f} | {floor:.2f} |")
    print(f"| 1% change | {one_pct:.2f} | |")
    print(f"no-op: {no_op_requests} request(s) to the API, DAGSTER_HOME grew {grown / 1e6:.3f} MB, "
          f"checks {checks:.2f} s ({checks / no_op:.0%} of the run)")
    print(f"1% change: {one_pct_inputs} input(s) sent (passages and new queries)")
    print("step durations (s), no-op | 1%:")
    for step in no_op_steps:
        print(f"  {step:40s} {no_op_steps[step]:6.3f} | {one_pct_steps.get(step, 0):6.3f}")


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [2000, 20000]
    server = FaultServer(dimension=DIMENSION).start()
    try:
        for size in sizes:
            with tempfile.TemporaryDirectory() as directory:
                bench(size, server, Path(directory))
    finally:
        server.stop()
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
