"""CLI no-op benchmark: `embedding-assets materialize` on an unchanged FAQ next to `python -c "import dagster"`.

Run: `.venv/bin/python bench/bench_cli.py [--templates 201] [--pairs 7]` (xlsxwriter comes with
the `test` extra). The FAQ is generated into a temp dir and embedded once through a local
OpenAI-compatible server that returns vectors instantly (so only our own machinery is timed);
then the two commands run alternately, pair by pair, and the medians and their ratio are printed.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.bench_faq import write_workbook  # noqa: E402
from embedding_assets_tests.openai_servers import FaultServer  # noqa: E402

CLI = str(Path(sys.executable).parent / "embedding-assets")


def environment(directory: Path, server: FaultServer) -> dict[str, str]:
    versions = directory / "model_versions.toml"
    versions.write_text(
        '[[model_version]]\nkey = "bench-v1"\nprovider = "openai"\nmodel = "instant"\ndimension = 8\n'
        f'batch_size = 64\nsettings = {{ base_url = "{server.base_url}" }}\n',
        encoding="utf-8",
    )
    return {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "EMBEDDING_ASSETS_FAQ_PATH": str(directory / "faq.xlsx"),
        "EMBEDDING_ASSETS_STORE": str(directory / "store.db"),
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(versions),
        "DAGSTER_HOME": str(directory / "dagster_home"),
        "OPENAI_API_KEY": "bench",
    }


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=201)
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    server = FaultServer(dimension=8).start()
    try:
        with tempfile.TemporaryDirectory() as temp:
            directory = Path(temp)
            write_workbook(directory / "faq.xlsx", args.templates)
            env = environment(directory, server)
            timed([CLI, "materialize"], env, directory)  # the first build
            ours, peer = [], []
            for _ in range(args.pairs):
                ours.append(timed([CLI, "materialize"], env, directory))
                peer.append(timed([sys.executable, "-c", "import dagster"], env, directory))
    finally:
        server.stop()
    ratios = [o / p for o, p in zip(ours, peer)]
    print(f"{args.templates} templates, {args.pairs} pairs (median of each; ratio: median of the pairs' ratios)")
    print(f"  embedding-assets materialize (no-op)  {statistics.median(ours):6.2f} s")
    print(f"  python -c 'import dagster'            {statistics.median(peer):6.2f} s")
    print(f"  ratio                                 {statistics.median(ratios):6.2f}x")


if __name__ == "__main__":
    main()
