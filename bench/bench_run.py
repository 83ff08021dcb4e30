"""One run of the embedding chain in process at N templates: first build, no-op, 1% change.

Provider "openai" against a local OpenAI-compatible server that answers instantly, so the figures are
the pipeline's own cost. Next to each no-op, two floors measured in the same run: the work itself (read
the sheet, hash every text, read the published hashes) and Dagster's own cost for a graph of the same
shape whose steps do nothing, on the same kind of instance (the one `embedding-assets` sets up in a new
DAGSTER_HOME: settings.instance_yaml). Also the bytes a no-op leaves in
DAGSTER_HOME, the peak RSS of each run (Linux: the peak is reset before each) and, with --profile,
the functions a no-op spends its time in (cProfile).

Run: `.venv/bin/python bench/bench_run.py [N ...] [--profile]` (default 2000 20000). Nothing is asserted.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import resource
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import dagster as dg
import xlsxwriter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets import settings  # noqa: E402
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
    """The bytes under DAGSTER_HOME once every SQLite write-ahead log is folded into its database: what the
    runs added, not how far a log has grown between checkpoints (kept open connections defer them)."""
    for database in home.rglob("*.db"):
        with closing(sqlite3.connect(database)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file())


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux; elsewhere the peak is the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(assets, resources, instance, profile: cProfile.Profile | None = None) -> tuple[float, dict, float]:
    """Seconds, step durations and peak RSS (MB) of one run."""
    reset_peak_rss()
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    result = dg.materialize(assets, partition_key=KEY, instance=instance, resources=resources, raise_on_error=False)
    if profile is not None:
        profile.disable()
    seconds = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"run failed: {result.get_step_failure_events()[0].event_specific_data.error.message}")
    steps = {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(result.run_id)}
    for event in result.get_asset_materialization_events():
        metadata = event.event_specific_data.materialization.metadata
        for name in ("reused_parse", "reused_hashes", "reused_plan"):
            if name in metadata:
                steps[f"({name})"] = float(metadata[name].value)
    return seconds, steps, peak_rss_mb()


REPEATS = 3


def median_run(runs: list[tuple[float, dict, float]]) -> tuple[float, dict, float]:
    """The run of median duration, with the highest peak RSS of all."""
    ordered = sorted(runs, key=lambda run: run[0])
    seconds, steps, _ = ordered[len(ordered) // 2]
    return seconds, steps, max(run[2] for run in runs)


def empty_graph() -> list:
    """The chain's shape (one asset, four partitioned ones, a check and a step of three checks) with steps that do nothing."""
    partitions = dg.StaticPartitionsDefinition([KEY])

    @dg.asset(name="faq_templates")
    def faq_templates() -> int:
        return 0

    @dg.asset(name="template_hashes", partitions_def=partitions)
    def template_hashes(faq_templates: int) -> int:
        return 0

    @dg.asset(name="change_plan", partitions_def=partitions)
    def change_plan(template_hashes: int) -> int:
        return 0

    @dg.asset(name="template_embeddings", partitions_def=partitions)
    def template_embeddings(change_plan: int) -> int:
        return 0

    @dg.asset(name="embedding_store", partitions_def=partitions)
    def embedding_store(change_plan: int, template_embeddings: int) -> int:
        return 0

    @dg.asset_check(asset=faq_templates)
    def faq_content(faq_templates: int) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    names = ("store_matches_faq", "retrieval_quality", "near_duplicate_templates")
    specs = [dg.AssetCheckSpec(name, asset="embedding_store",
                               additional_deps=["faq_templates"] if name == "store_matches_faq" else None)
             for name in names]

    @dg.multi_asset_check(name="embedding_store_checks", specs=specs, ins={"faq_templates": dg.AssetIn("faq_templates")})
    def embedding_store_checks(faq_templates: int):
        for name in names:
            yield dg.AssetCheckResult(asset_key=dg.AssetKey("embedding_store"), check_name=name, passed=True)

    return [faq_templates, template_hashes, change_plan, template_embeddings, embedding_store,
            faq_content, embedding_store_checks]


def project_instance(home: Path) -> dg.DagsterInstance:
    """A new instance in `home` as `embedding-assets` sets one up (settings.instance_yaml)."""
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.instance_yaml(home))
    return dg.DagsterInstance.from_config(str(home))


def dagster_floor_seconds(directory: Path, runs: int = 3) -> float:
    """The fastest of a few runs of the empty graph on a fresh instance like the benchmark's."""
    times = []
    with project_instance(directory / "empty-home") as instance:
        graph = empty_graph()
        for _ in range(runs):
            started = time.perf_counter()
            dg.materialize(graph, partition_key=KEY, instance=instance)
            times.append(time.perf_counter() - started)
    return min(times)


def floor_seconds(faq: Path, store: Path, versions: Path) -> float:
    text_template = ModelVersionCatalog.load(versions).get(KEY).text_template
    started = time.perf_counter()
    hash_templates(parse_faq(faq), text_template)
    with open_store(store, create=False) as opened:
        opened.published(KEY)
    return time.perf_counter() - started


def bench(size: int, server: FaultServer, directory: Path, profile: bool) -> None:
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

    profiler = cProfile.Profile() if profile else None
    with project_instance(directory / "home") as instance:
        home = directory / "home"
        cold, _, cold_rss = timed_run(assets, resources(faq), instance)
        timed_run(assets, resources(faq), instance)  # the first no-op records its all-unchanged plan
        server.reset()
        before = home_bytes(home)
        no_ops = [timed_run(assets, resources(faq), instance, profiler if n == 0 else None) for n in range(REPEATS)]
        grown = (home_bytes(home) - before) / REPEATS
        no_op_requests = len(server.requests)
        server.reset()
        # a 1% change each time: to the edited FAQ, back to the original, to the edited one again
        one_pcts = [timed_run(assets, resources(changed), instance)]
        one_pct_inputs = len(server.inputs)  # the next changes find their texts in the cache
        one_pcts += [timed_run(assets, resources(faq if n % 2 else changed), instance) for n in range(1, REPEATS)]
    no_op, no_op_steps, no_op_rss = median_run(no_ops)
    one_pct, one_pct_steps, one_pct_rss = median_run(one_pcts)
    floor = floor_seconds(faq, store, versions)
    dagster_floor = dagster_floor_seconds(directory)
    checks = sum(v for k, v in no_op_steps.items() if k.startswith("embedding_store_") or k.endswith("_faq_content"))
    print(f"\n## {size:,} templates")
    print("| run | ours (s) | work floor (s) | Dagster floor (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    print(f"| first build | {cold:.2f} | | | {cold_rss:.0f} |")
    print(f"| no-op (median of {REPEATS}) | {no_op:.2f} | {floor:.2f} | {dagster_floor:.2f} | {no_op_rss:.0f} |")
    print(f"| 1% change (median of {REPEATS}) | {one_pct:.2f} | | | {one_pct_rss:.0f} |")
    print(f"no-op: {no_op_requests} request(s) to the API, DAGSTER_HOME grew {grown / 1e6:.3f} MB per run, "
          f"checks {checks:.2f} s ({checks / no_op:.0%} of the run)")
    print(f"1% change: {one_pct_inputs} input(s) sent by the first (passages and new queries)")
    print("step durations (s), no-op | 1%:")
    for step in no_op_steps:
        print(f"  {step:40s} {no_op_steps[step]:6.3f} | {one_pct_steps.get(step, 0):6.3f}")
    if profiler is not None:
        printed = io.StringIO()
        pstats.Stats(profiler, stream=printed).sort_stats("tottime").print_stats(25)
        print("no-op profile (cProfile, by own time):")
        print(printed.getvalue())


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--profile"]
    sizes = [int(a) for a in args] or [2000, 20000]
    server = FaultServer(dimension=DIMENSION).start()
    try:
        for size in sizes:
            with tempfile.TemporaryDirectory() as directory:
                bench(size, server, Path(directory), profile="--profile" in sys.argv[1:])
    finally:
        server.stop()
    print(f"\npeak RSS of the whole benchmark {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
