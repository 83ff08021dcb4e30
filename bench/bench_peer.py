"""The embed_faq job next to LangChain's indexing API on the same FAQ workload, embedders without model cost.

Workload per size N: N synthetic templates, index, re-index unchanged (no-op), change every 100th
answer (1%), re-index. Ours: the `embed_faq` job of the code location (`Definitions` resolved once,
imports and the Dagster instance excluded from the times, like LangChain's objects), provider
`openai` against an OpenAI-compatible server in this process that returns deterministic vectors at
once, a SQLite store and a DAGSTER_HOME set up as the CLI sets one up (settings.instance_yaml);
then the `embedding-assets materialize` CLI as a whole process (no-op, then another 1% change). Peer: LangChain `index()` with
`SQLRecordManager` (SQLite), `InMemoryVectorStore` and an `Embeddings` object returning the same
vectors. Each side runs in its own child process, so its peak RSS is its own.

Run: `.venv/bin/python bench/bench_peer.py [--sizes 201 2000 20000 100000] [--dimension 384]`
(LangChain comes with the `bench` extra). Prints tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets import settings  # noqa: E402

KEY = "bench-openai"
TEXT_TEMPLATE = "{subcategory}: {question}\n{answer}"
BATCH_SIZE = 128
HEADER = ["ID", "Основная категория", "Подкатегория", "Пример вопроса", "Приоритет", "Целевая аудитория", "Шаблонный ответ"]
CATEGORIES = ["Карты", "Переводы и платежи", "Кредиты", "Вклады и накопления", "Мобильный банк и онлайн"]
PHASES = ("index", "no-op", "1%")


def instant_vector(text: str, dimension: int) -> list[float]:
    """A deterministic unit vector for a text, the same on both sides."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


def rows(n: int, edit: int) -> list[list[str]]:
    """N FAQ rows; edit k > 0 rewrites every 100th answer (the 1% change), differently for each k."""
    table = []
    for i in range(1, n + 1):
        answer = f"Откройте приложение, выберите карту {i} и раздел «Лимиты»; изменения действуют сразу."
        if edit and i % 100 == 0:
            answer += f" Правка {edit}: лимит можно вернуть в том же разделе."
        table.append([f"T-{i:06d}", CATEGORIES[i % len(CATEGORIES)], f"Подкатегория {i % 97}",
                      f"Как изменить лимит операции номер {i} в мобильном приложении?",
                      ("высокий", "средний", "низкий")[i % 3], "все клиенты", answer])
    return table


def write_workbook(path: Path, n: int, edit: int) -> Path:
    import xlsxwriter

    book = xlsxwriter.Workbook(str(path))
    sheet = book.add_worksheet("FAQ")
    sheet.write_row(0, 0, HEADER)
    for r, row in enumerate(rows(n, edit), start=1):
        sheet.write_row(r, 0, row)
    book.close()
    return path


class InstantServer:
    """`/v1/embeddings` answered at once with instant_vector; GET /stats counts requests and inputs."""

    def __init__(self, dimension: int):
        self.dimension = dimension
        self.requests = 0
        self.inputs = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                with server._lock:
                    self._send(json.dumps({"requests": server.requests, "inputs": server.inputs}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                with server._lock:
                    server.requests += 1
                    server.inputs += len(inputs)
                data = [{"object": "embedding", "index": i, "embedding": instant_vector(t, server.dimension)}
                        for i, t in enumerate(inputs)]
                tokens = sum(len(t.split()) for t in inputs)
                self._send(json.dumps({"object": "list", "data": data, "model": body["model"],
                                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode())

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.inputs

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def server_counts(base_url: str) -> tuple[int, int]:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as response:
        stats = json.loads(response.read())
    return stats["requests"], stats["inputs"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def directory_mb(path: Path) -> float:
    """MB under `path`, every SQLite write-ahead log folded into its database first (what was written, not
    how far a log grew between checkpoints)."""
    if not path.exists():
        return 0.0
    for database in path.rglob("*.db"):
        with closing(sqlite3.connect(database)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# ---- child processes -------------------------------------------------------------------------


def run_ours(work: Path, base_url: str) -> dict:
    """The embed_faq job in process, three phases; imports, Definitions and the instance outside the times."""
    import dagster as dg

    from embedding_assets.definitions import defs
    from embedding_assets.defs.jobs import EMBED_FAQ_JOB

    job = defs().resolve_job_def(EMBED_FAQ_JOB)
    run_config = {"ops": {"change_plan": {"config": {"force": False}}}}
    phases = []
    with dg.DagsterInstance.get() as instance:
        for phase, edit in zip(PHASES, (0, 0, 1)):
            shutil.copyfile(work / f"faq-{edit}.xlsx", work / "faq.xlsx")
            before = server_counts(base_url)
            started = time.perf_counter()
            result = job.execute_in_process(instance=instance, partition_key=KEY, run_config=run_config,
                                            raise_on_error=False)
            seconds = time.perf_counter() - started
            after = server_counts(base_url)
            plan = {}
            if result.success:
                plan = result.output_for_node("change_plan").counts()
            embedded = None
            for event in result.get_asset_materialization_events():
                materialization = event.event_specific_data.materialization
                if materialization.asset_key.to_user_string() == "template_embeddings":
                    embedded = materialization.metadata["embedded"].value
            home = Path(os.environ["DAGSTER_HOME"])
            phases.append({"phase": phase, "seconds": seconds, "success": result.success, "plan": plan,
                           "embedded": embedded, "requests": after[0] - before[0], "inputs": after[1] - before[1],
                           "dagster_home_mb": directory_mb(home)})
    return {"phases": phases, "peak_rss_mb": peak_rss_mb()}


def run_langchain(n: int, dimension: int, work: Path) -> dict:
    """LangChain index() over the same texts; imports and object construction outside the times."""
    from langchain_classic.indexes import SQLRecordManager, index
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    class InstantEmbeddings(Embeddings):
        def __init__(self) -> None:
            self.inputs = 0

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            self.inputs += len(texts)
            return [instant_vector(t, dimension) for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return instant_vector(text, dimension)

    embeddings = InstantEmbeddings()
    store = InMemoryVectorStore(embedding=embeddings)
    records = SQLRecordManager("faq", db_url=f"sqlite:///{work / 'langchain-records.db'}")
    records.create_schema()
    phases = []
    for phase, edit in zip(PHASES, (0, 0, 1)):
        documents = [
            Document(page_content=TEXT_TEMPLATE.format(subcategory=r[2], question=r[3], answer=r[6]),
                     metadata={"source": r[0], "category": r[1]})
            for r in rows(n, edit)
        ]
        before = embeddings.inputs
        started = time.perf_counter()
        result = index(documents, records, store, cleanup="full", source_id_key="source",
                       batch_size=BATCH_SIZE, key_encoder="sha256")
        seconds = time.perf_counter() - started
        phases.append({"phase": phase, "seconds": seconds, "result": dict(result),
                       "inputs": embeddings.inputs - before, "stored": len(store.store)})
    return {"phases": phases, "peak_rss_mb": peak_rss_mb()}


# ---- the parent ------------------------------------------------------------------------------


def child_environment(work: Path, base_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
        "DAGSTER_HOME": str(work / "dagster_home"),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{work / 'embeddings.db'}",
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(work / "model_versions.toml"),
        "EMBEDDING_ASSETS_FAQ_PATH": str(work / "faq.xlsx"),
        "BENCH_BASE_URL": base_url,
    })
    env.pop("OPENAI_API_KEY", None)
    return env


def timed_process(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str, int]:
    """Wall seconds, stdout and exit code of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode:
        sys.stderr.write(err.decode()[-2000:])
    return seconds, out.decode(), process.returncode


def run_child(side: str, n: int, dimension: int, work: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", side, "--sizes", str(n), "--dimension", str(dimension),
               "--work", str(work)]
    _, out, code = timed_process(command, env, work)
    if code:
        raise SystemExit(f"the {side} side failed at {n} templates (exit {code})")
    return json.loads(out.strip().splitlines()[-1])


def cli_materialize(work: Path, env: dict[str, str], edit: int, server: InstantServer) -> dict:
    shutil.copyfile(work / f"faq-{edit}.xlsx", work / "faq.xlsx")
    cli = str(Path(sys.executable).parent / "embedding-assets")
    before = server.counts()
    # A fresh wrapper per call, so RUSAGE_CHILDREN's maximum is this process alone.
    wrapper = [sys.executable, "-c",
               "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); s = time.perf_counter() - t; "
               "print(json.dumps({'seconds': s, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "'code': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:]}))",
               cli, "materialize", "--model", KEY, "--json"]
    _, out, _ = timed_process(wrapper, env, work)
    report = json.loads(out)
    after = server.counts()
    summary = {}
    for line in report["out"].splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    if report["code"]:
        sys.stderr.write(report["err"])
    return {"seconds": report["seconds"], "peak_rss_mb": report["rss"], "code": report["code"],
            "plan": {k: summary.get(k) for k in ("new", "modified", "deleted", "unchanged")},
            "requests": after[0] - before[0], "inputs": after[1] - before[1]}


def import_dagster_pairs(work: Path, env: dict[str, str], server: InstantServer, pairs: int) -> list[tuple[float, float]]:
    """`python -c "import dagster"` and a CLI no-op, pair by pair."""
    found = []
    for _ in range(pairs):
        seconds, _, _ = timed_process([sys.executable, "-c", "import dagster"], env, work)
        found.append((seconds, cli_materialize(work, env, 2, server)["seconds"]))
    return found


def bench_size(n: int, dimension: int, server: InstantServer, root: Path, dagster_pairs: int) -> dict:
    work = root / f"n{n}"
    work.mkdir()
    for edit in (0, 1, 2):
        write_workbook(work / f"faq-{edit}.xlsx", n, edit)
    (work / "model_versions.toml").write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "instant"\ndimension = {dimension}\n'
        f'text_template = {json.dumps(TEXT_TEMPLATE)}\nbatch_size = {BATCH_SIZE}\n'
        f'settings = {{ base_url = "{server.base_url}" }}\n'
    )
    (work / "dagster_home").mkdir()
    (work / "dagster_home" / "dagster.yaml").write_text(settings.instance_yaml(work / "dagster_home"))  # as `embedding-assets` sets it up
    env = child_environment(work, server.base_url)
    langchain = run_child("langchain", n, dimension, work, env)
    ours = run_child("ours", n, dimension, work, env)
    cli_noop = cli_materialize(work, env, 1, server)
    cli_change = cli_materialize(work, env, 2, server)
    pairs = import_dagster_pairs(work, env, server, dagster_pairs) if dagster_pairs else []
    return {"n": n, "ours": ours, "langchain": langchain, "cli_noop": cli_noop, "cli_change": cli_change,
            "dagster_pairs": pairs}


def report(results: list[dict]) -> None:
    print("\n### Times (seconds; in process: imports excluded)")
    print("| N | LangChain index | ours index | LangChain no-op | ours no-op | no-op ratio | LangChain 1% | ours 1% "
          "| 1% ratio | ours CLI no-op | CLI no-op vs LangChain no-op | ours CLI 1% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lc = {p["phase"]: p["seconds"] for p in r["langchain"]["phases"]}
        us = {p["phase"]: p["seconds"] for p in r["ours"]["phases"]}
        print(f"| {r['n']:,} | {lc['index']:.3f} | {us['index']:.3f} | {lc['no-op']:.3f} | {us['no-op']:.3f} "
              f"| {lc['no-op'] / us['no-op']:.2f}× | {lc['1%']:.3f} | {us['1%']:.3f} | {lc['1%'] / us['1%']:.2f}× "
              f"| {r['cli_noop']['seconds']:.2f} | {lc['no-op'] / r['cli_noop']['seconds']:.2f}× "
              f"| {r['cli_change']['seconds']:.2f} |")
    print("(ratio = LangChain's time / ours: above 1× ours is faster)")

    print("\n### Inputs embedded per phase (ours: counted by the server; LangChain: by its Embeddings object)")
    print("| N | phase | LangChain inputs | LangChain added / updated / skipped / deleted | ours inputs (requests) "
          "| ours plan new / modified / deleted / unchanged | ours run ok |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for lc, us in zip(r["langchain"]["phases"], r["ours"]["phases"]):
            res = lc["result"]
            plan = us["plan"]
            print(f"| {r['n']:,} | {lc['phase']} | {lc['inputs']} | {res['num_added']} / {res['num_updated']} / "
                  f"{res['num_skipped']} / {res['num_deleted']} | {us['inputs']} ({us['requests']}) | "
                  f"{plan.get('new')} / {plan.get('modified')} / {plan.get('deleted')} / {plan.get('unchanged')} "
                  f"| {us['success']} |")
        for name in ("cli_noop", "cli_change"):
            c = r[name]
            plan = c["plan"]
            print(f"| {r['n']:,} | CLI {'no-op' if name == 'cli_noop' else '1%'} | | | {c['inputs']} ({c['requests']}) "
                  f"| {plan['new']} / {plan['modified']} / {plan['deleted']} / {plan['unchanged']} | {c['code'] == 0} |")

    print("\n### Peak RSS (MB) and DAGSTER_HOME")
    print("| N | LangChain process | ours in process (3 runs) | ours CLI no-op | ours CLI 1% "
          "| DAGSTER_HOME after index / no-op / 1% (MB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        homes = " / ".join(f"{p['dagster_home_mb']:.1f}" for p in r["ours"]["phases"])
        print(f"| {r['n']:,} | {r['langchain']['peak_rss_mb']:.0f} | {r['ours']['peak_rss_mb']:.0f} "
              f"| {r['cli_noop']['peak_rss_mb']:.0f} | {r['cli_change']['peak_rss_mb']:.0f} | {homes} |")

    for r in results:
        if r["dagster_pairs"]:
            print(f"\n### CLI no-op at {r['n']:,} next to `python -c \"import dagster\"`, pair by pair")
            print("| pair | import dagster s | CLI no-op s | ratio |")
            print("|---|---|---|---|")
            for i, (imp, cli) in enumerate(r["dagster_pairs"], start=1):
                print(f"| {i} | {imp:.2f} | {cli:.2f} | {cli / imp:.2f}× |")
            ratios = [cli / imp for imp, cli in r["dagster_pairs"]]
            print(f"median ratio {statistics.median(ratios):.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[201, 2000, 20000, 100000])
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--dagster-pairs", type=int, default=3,
                        help="CLI no-op / `import dagster` pairs at the smallest size (default 3)")
    parser.add_argument("--child", choices=["ours", "langchain"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ours":
        print(json.dumps(run_ours(args.work, os.environ["BENCH_BASE_URL"])))
        return
    if args.child == "langchain":
        print(json.dumps(run_langchain(args.sizes[0], args.dimension, args.work)))
        return

    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start; "
          f"{args.dimension}-d vectors, batches of {BATCH_SIZE}")
    server = InstantServer(args.dimension)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-peer-") as directory:
            for i, n in enumerate(args.sizes):
                started = time.perf_counter()
                results.append(bench_size(n, args.dimension, server, Path(directory),
                                          args.dagster_pairs if i == 0 else 0))
                print(f"{n:,} templates done in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        server.stop()
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end")
    report(results)


if __name__ == "__main__":
    main()
