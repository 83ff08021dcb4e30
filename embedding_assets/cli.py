"""`embedding-assets`: materialize the store, inspect it, search it."""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import click

from embedding_assets import settings
from embedding_assets.store import EmbeddingStore, StoreError, open_store, redact_url

# Errors Dagster raises around the user code's own exception (kept as their cause).
DAGSTER_WRAPPERS = frozenset(
    {
        "DagsterExecutionStepExecutionError",
        "DagsterExecutionHandleOutputError",
        "DagsterExecutionLoadInputError",
        "DagsterResourceFunctionError",
        "DagsterUserCodeExecutionError",
    }
)
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # a run failed before publishing: the store is unchanged
EXIT_USAGE = 2  # click's code for a bad option or argument
EXIT_FAILED_AFTER_PUBLISH = 3  # a run published a new generation, then a later step (a check) failed
EXIT_PROMOTION_REFUSED = 4  # `versions promote`: the candidate's top-3 is lower than the current version's
EXIT_BUDGET_REFUSED = 5  # the budget guard refused a run before it embedded anything: the store is unchanged
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def store_option(command):
    """`--store URL`: the store a command reads or writes (default: EMBEDDING_ASSETS_STORE, else data/embeddings.db)."""

    def use_store(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
        if value:
            os.environ[settings.STORE_VAR] = value  # the Dagster definitions read it from the environment
        return value

    return click.option(
        "--store", "store_url", expose_value=False, callback=use_store, is_eager=True,
        help=f"Store URL (default: {settings.STORE_VAR} or data/embeddings.db).",
    )(command)


def faq_options(command):
    """`--faq PATH` and `--faq-sheet NAME`: the FAQ a command reads (they set the variables the settings read)."""

    def use_faq(variable: str):
        def callback(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
            if value:
                os.environ[variable] = value
            return value

        return callback

    command = click.option(
        "--faq-sheet", expose_value=False, callback=use_faq(settings.FAQ_SHEET_VAR),
        help="The FAQ's sheet (default: the active sheet when visible, else the first visible one).",
    )(command)
    return click.option(
        "--faq", expose_value=False, callback=use_faq(settings.FAQ_PATH_VAR),
        help=f"The FAQ file (default: {settings.FAQ_PATH_VAR}, the config's [faq] path, {settings.DEFAULT_FAQ_PATH}).",
    )(command)


def _budget_limits():
    """The budget guard's limits from the environment; a bad value is a usage error."""
    try:
        return settings.budget_limits()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _emit(payload: object, as_json: bool, text: str) -> None:
    click.echo(json.dumps(payload, ensure_ascii=False) if as_json else text)


def run_failures(result) -> list[dict[str, str]]:
    """Each failed step with the user-facing message of its error, without Dagster's wrapping."""
    failures = []
    for event in result.all_events:
        if event.is_step_failure:
            failures.append({"step": event.step_key, "message": _own_message(event.step_failure_data.error)})
    if not failures:
        for event in result.all_events:
            if event.is_run_failure and event.event_specific_data.error is not None:
                failures.append({"step": None, "message": _own_message(event.event_specific_data.error)})
    return failures


def _own_message(error) -> str:
    while error.cause is not None and error.cls_name in DAGSTER_WRAPPERS:
        error = error.cause
    message = error.message.strip()
    prefix = f"{error.cls_name}: "
    if prefix in message:
        message = message.split(prefix, 1)[1]
    return message


def _described(failure: dict[str, str | None]) -> str:
    return f"step {failure['step']} failed: {failure['message']}" if failure["step"] else failure["message"]


def run_failure_message(result) -> str:
    """The first failed step and its error's own message."""
    failures = run_failures(result)
    return _described(failures[0]) if failures else "the run failed"


@click.group()
def main() -> None:
    """Keep a FAQ's embeddings fresh, cheap and safe to serve.

    \b
    Exit codes:
      0  success
      1  the command failed; a failed `materialize` run published nothing
      2  usage error (unknown option, bad value, unknown model version)
      3  `materialize` published a new generation, then a later step (a check) failed
      4  `versions promote` refused a version whose top-3 is lower than the current one's
      5  `materialize` was refused by the budget guard: nothing embedded, the store unchanged
    """
    # The local model's threads sleep between calls instead of spinning: on a busy machine spinning
    # threads made each query embedding many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    # Everything is closed by then: the interpreter need not search Dagster's millions of objects for
    # cycles on its way out (that search took about 0.8 s of every command that had run a job).
    atexit.register(gc.freeze)


@main.command()
@click.option("--model", "model_key", help="Model version key (default: every active version).")
@click.option("--force", is_flag=True, help="Rebuild from scratch: re-embed every template, bypassing the cache.")
@click.option("--approve", is_flag=True, help="Let the run embed past the budget guard's limits (see `plan`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model version.")
@click.option("--faq", "faq_path", help=f"The FAQ file (default: {settings.FAQ_PATH_VAR}, the config's [faq] path, {settings.DEFAULT_FAQ_PATH}).")
@click.option("--faq-sheet", help="The FAQ's sheet (default: the active sheet when visible, else the first visible one).")
@store_option
def materialize(
    model_key: str | None, force: bool, approve: bool, as_json: bool, faq_path: str | None, faq_sheet: str | None
) -> None:
    """Run the embedding job in DAGSTER_HOME's instance (the runs show in the UI)."""
    settings.dagster_home()
    for variable, value in ((settings.FAQ_PATH_VAR, faq_path), (settings.FAQ_SHEET_VAR, faq_sheet)):
        if value:
            os.environ[variable] = value
    _budget_limits()
    import dagster as dg

    from embedding_assets.definitions import defs
    from embedding_assets.defs.jobs import EMBED_FAQ_JOB
    from embedding_assets.lib.model_versions import load_model_versions
    from embedding_assets.lib.progress import listening

    versions = load_model_versions(settings.model_versions_path())
    if model_key is None:
        keys = [v.key for v in versions if v.active]
    elif model_key in {v.key for v in versions}:
        keys = [model_key]
    else:
        raise click.UsageError(f"unknown model version {model_key!r}; declared: {', '.join(v.key for v in versions)}")
    job = defs().resolve_job_def(EMBED_FAQ_JOB)
    run_config = {**QUIET_LOGS, "ops": {"change_plan": {"config": {"force": force}}}}
    if approve or force:
        run_config["resources"] = {"budget": {"config": {"approved": True}}}
    exit_code = EXIT_OK
    display = ProgressDisplay(terminal=sys.stdout.isatty())
    freeze_loaded_objects()
    with dg.DagsterInstance.get() as instance, nullcontext() if as_json else listening(display):
        for key in keys:
            result = job.execute_in_process(
                instance=instance, partition_key=key, run_config=run_config, raise_on_error=False
            )
            display.close()
            report = run_report(key, result)
            if report["success"] or report["published"]:
                _emit(report, as_json, summary_text(report))
            elif as_json:
                _emit(report, as_json, "")
            if report["refused"]:
                exit_code = max(exit_code, EXIT_BUDGET_REFUSED)
                click.echo(refusal_text(report), err=True)
            elif not report["success"]:
                exit_code = max(exit_code, EXIT_FAILED_AFTER_PUBLISH if report["published"] else EXIT_RUN_FAILED)
                click.echo(failure_text(report), err=True)
    try:
        with open_store(settings.store_url(), create=False) as store:
            current = store.current_version()
    except StoreError:
        current = None
    for warning in stale_current_warnings(current, versions):
        click.echo(f"warning: {warning}", err=True)
    sys.exit(exit_code)


def freeze_loaded_objects() -> None:
    """Leave what is loaded so far (Dagster and the definitions: hundreds of thousands of objects that live
    as long as the command) out of the cycle collector's searches, so the runs' collections visit only the
    runs' own objects. A frozen object that later becomes cyclic garbage stays until the command exits."""
    gc.freeze()


def stale_current_warnings(current: str | None, declared) -> list[str]:
    """A warning when the store's current version is one that runs no longer refresh (not active)."""
    active = [v.key for v in declared if v.active]
    if current is None or current in active or not active:
        return []
    state = "declared inactive" if current in {v.key for v in declared} else "no longer declared"
    return [
        f"the current version {current} is {state} in model_versions.toml: runs no longer refresh it, "
        f"and searches answer from it until an active version is promoted "
        f"(embedding-assets versions promote {active[0]})"
    ]


class ProgressDisplay:
    """Embedding progress: a bar (texts, batches, rate, ETA) on a terminal, else one plain line per batch."""

    def __init__(self, terminal: bool):
        self.terminal = terminal
        self.bar = None

    def __call__(self, progress) -> None:
        if not self.terminal:
            click.echo(progress.line())
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, desc=f"{progress.model_version}: embedding", unit="text",
                            file=sys.stdout, dynamic_ncols=True)
        self.bar.set_postfix_str(f"batch {progress.batches} of {progress.batches_total}", refresh=False)
        self.bar.update(progress.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_report(key: str, result) -> dict:
    """What a run did, from its events: the plan, the embedding cost, what it published, and its errors."""
    from embedding_assets.defs.budget import BUDGET_CHECK

    counts = result.output_for_node("change_plan").counts() if result.is_node_success("change_plan") else {}
    embedded: dict = {}
    published: dict = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        name = materialization.asset_key.to_user_string()
        values = {k: v.value for k, v in materialization.metadata.items()}
        if name == "template_embeddings":
            embedded = values
        elif name == "embedding_store":
            published = values
    check_cost = {"requests": 0, "inputs": 0}
    changed_queries = None
    refused = None
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.check_name == BUDGET_CHECK and not evaluation.passed:
            refused = (evaluation.description or "").removeprefix(f"{key}: ")
        for item, field in (("requests", "requests"), ("inputs", "query_vectors_embedded")):
            if field in evaluation.metadata:
                check_cost[item] += int(evaluation.metadata[field].value)
        if evaluation.check_name == "retrieval_quality" and "changed_queries" in evaluation.metadata:
            changed_queries = evaluation.metadata["changed_queries"].value
    return {
        "model_version": key,
        "success": result.success,
        **{name: counts.get(name) for name in ("new", "modified", "deleted", "unchanged", "metadata_updated")},
        "embedded": embedded.get("embedded"),
        "embedding_calls": embedded.get("embedding_calls"),
        "embed_ms": embedded.get("embed_ms"),
        "requests": embedded.get("requests", 0) + check_cost["requests"],
        "inputs": embedded.get("inputs", 0) + check_cost["inputs"],
        "tokens": embedded.get("tokens"),
        "retries": embedded.get("retries", 0),
        "check_requests": check_cost["requests"],
        "rows": published.get("rows"),
        "generation": published.get("generation"),
        "published": bool(published.get("published")),
        "current": published.get("current_version"),
        "store": published.get("store"),
        "errors": run_failures(result) if not result.success else [],
        "refused": refused,
        "run_id": result.run_id,
        "changed_queries": changed_queries,
    }


def summary_text(c: dict) -> str:
    key = c["model_version"]
    if c["published"]:
        outcome = f"published generation {c['generation']}: {c['rows']} rows"
    else:
        outcome = f"{c['rows']} rows at generation {c['generation']}"
    return (
        f"{key}: {c['new']} new, {c['modified']} modified, {c['deleted']} deleted, {c['unchanged']} unchanged "
        f"({c['metadata_updated']} with updated fields); embedded {c['embedded']} text(s) in "
        f"{c['embedding_calls']} call(s); {outcome}{' (current)' if c['current'] else ''} in {c['store']}\n"
        f"{key}: cost {c['requests']} request(s) ({c['check_requests']} by the checks), {c['inputs']} input(s), "
        f"{'n/a' if c['tokens'] is None else c['tokens']} passage token(s), {c['retries']} retries, "
        f"{(c['embed_ms'] or 0) / 1000:.2f} s"
    )


def failure_text(c: dict) -> str:
    key = c["model_version"]
    lines = [f"{key}: {_described(failure)}" for failure in c["errors"] or [{"step": None, "message": "the run failed"}]]
    if c["published"]:
        lines.append(
            f"{key}: published generation {c['generation']} is live; a step after the publish failed (run {c['run_id']})"
        )
    else:
        lines.append(f"{key}: the published store is unchanged (run {c['run_id']})")
    return "\n".join(lines)


def refusal_text(c: dict) -> str:
    key = c["model_version"]
    return (
        f"{key}: refused by the budget guard: {c['refused']}\n"
        f"{key}: nothing was embedded and the published store is unchanged (run {c['run_id']})"
    )


@contextmanager
def _existing_store(*, write: bool = False) -> Iterator[EmbeddingStore]:
    """The configured store, which must exist; read-only unless write is asked for."""
    url = settings.store_url()
    try:
        store = open_store(url, create=False)
        if write:
            store.close()
            store = open_store(url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
def status(as_json: bool) -> None:
    """Published model versions: rows, generation, last publish."""
    url = settings.store_url()
    with _existing_store() as store:
        versions = [v.as_dict() for v in store.versions()]
        state = store.state()
        read_only = store.read_only_reason
    generation = state.generation
    payload = {"store": redact_url(url), "store_id": state.store_id, "generation": generation, "versions": versions}
    lines = [f"store {redact_url(url)} at generation {generation}"]
    if read_only:
        payload["read_only"] = read_only
        lines[0] += f" (read-only: {read_only})"
    lines += [
        f"  {'*' if v['current'] else ' '} {v['model_version']}: {v['rows']} rows, generation {v['generation']}, "
        f"{v['provider']}:{v['model']} ({v['dimension']}-d), last published {v['published_at']}"
        for v in versions
    ]
    from embedding_assets.lib.model_versions import ModelVersionError, load_model_versions

    try:
        current = next((v["model_version"] for v in versions if v["current"]), None)
        warnings = stale_current_warnings(current, load_model_versions(settings.model_versions_path()))
    except ModelVersionError as exc:
        warnings = [str(exc)]
    payload["warnings"] = warnings
    lines += [f"warning: {w}" for w in warnings]
    _emit(payload, as_json, "\n".join(lines))


@main.group()
def versions() -> None:
    """List, promote, roll back and prune the model versions published in the store."""


VERSION_COLUMNS = ("model_version", "provider", "model", "dimension", "rows", "created_at", "published_at",
                   "generation", "restorable", "current")


@versions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
def versions_list(as_json: bool) -> None:
    """Every published version; the current one is marked with *."""
    with _existing_store() as store:
        restorable = store.restorable()
        rows = [{**v.as_dict(), "restorable": len(restorable.get(v.key, []))} for v in store.versions()]
    table = [VERSION_COLUMNS] + [
        tuple("*" if name == "current" and row[name] else "" if name == "current" else str(row[name])
              for name in VERSION_COLUMNS)
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(VERSION_COLUMNS))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)
    _emit(rows, as_json, text if rows else "no model version has been published")


@versions.command("promote")
@click.argument("key")
@click.option("--force", is_flag=True, help="Promote even when its top-3 on the labelled queries is lower.")
@click.option("--queries", "queries_path", type=click.Path(dir_okay=False),
              help=f"Labelled queries of the quality gate (default: {settings.VALIDATION_QUERIES_VAR}, "
                   "else data/validation_queries.json of the project).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the promotion and the quality review.")
@store_option
def versions_promote(key: str, force: bool, queries_path: str | None, as_json: bool) -> None:
    """Make a published version the one readers use (one transaction), unless its top-3 is lower.

    Both versions are evaluated on the labelled queries first (query vectors from the store's
    cache); a lower top-3 is refused with exit code 4 unless --force is given.
    """
    from embedding_assets.lib.embedders import EmbeddingError, embedder_for
    from embedding_assets.lib.model_versions import load_model_versions
    from embedding_assets.retrieval.evaluation import QueriesFileError, load_queries
    from embedding_assets.retrieval.promotion import PromotionReview, declared_or_stored, review_promotion

    queries_path = queries_path or settings.validation_queries_path()
    reviewed = True
    with _existing_store(write=True) as store:
        try:
            review = review_promotion(
                store, settings.store_url(), key, load_queries(queries_path), queries_file=queries_path,
                model_version=declared_or_stored(load_model_versions(settings.model_versions_path())),
                embedder=embedder_for,
            )
        except (QueriesFileError, EmbeddingError) as exc:
            if not force:
                raise click.ClickException(f"cannot review the promotion of {key}: {exc}; promote it anyway with "
                                           "--force") from exc
            click.echo(f"{key}: promoted without a quality review ({exc})", err=True)
            reviewed = False
            review = PromotionReview(key, store.current_version(), queries_path, note=f"not reviewed: {exc}")
        refused = review.worse and not force
        previous = store.current_version()
        info = None if refused else store.promote(key)
    payload = {"model_version": key, "promoted": not refused, "previous": previous,
               "current": previous if refused else key, "forced": force and review.worse, "review": review.as_dict()}
    if refused:
        if as_json:
            click.echo(json.dumps(payload, ensure_ascii=False))
        click.echo(review.refusal(), err=True)
        sys.exit(EXIT_PROMOTION_REFUSED)
    if previous == key:
        text = f"{key} is already the current version ({info.rows} rows)"
    else:
        text = f"{key} is now the current version ({info.rows} rows); it was {previous or 'none'}"
    if review.compared:
        text = f"{review.summary()}{' (promoted with --force)' if review.worse else ''}\n{text}"
    elif reviewed and previous not in (None, key):
        click.echo(f"{key}: {review.note}", err=True)
    _emit(payload, as_json, text)


@versions.command("rollback")
@click.argument("key")
@click.option("--lock-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a run that is writing this version.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
def versions_rollback(key: str, lock_timeout: float, as_json: bool) -> None:
    """Publish KEY's previous generation again: its exact rows and vectors, as a new generation (one transaction)."""
    try:
        with _existing_store(write=True) as store, store.writer_lock(key, timeout=lock_timeout):
            result = store.rollback(key)
    except (StoreError, click.ClickException) as exc:
        message = exc.message if isinstance(exc, click.ClickException) else str(exc)
        if as_json:
            _emit({"model_version": key, "rolled_back": False, "error": message}, True, "")
        raise click.ClickException(message) from exc
    further = ", ".join(map(str, result.restorable)) or "none"
    _emit(
        {**result.as_dict(), "rolled_back": True},
        as_json,
        f"{key}: restored generation {result.restored_generation} as generation {result.generation} "
        f"({result.rows} rows), replacing generation {result.replaced_generation}; "
        f"earlier generations still restorable: {further}",
    )


@versions.command("prune")
@click.argument("key")
@store_option
def versions_prune(key: str) -> None:
    """Delete a version that is not current, with its cached vectors."""
    with _existing_store(write=True) as store:
        removed = store.prune(key)
    click.echo(f"pruned {key}: {removed} rows removed")


@main.command()
@click.argument("text")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, settings.MAX_TOP_K),
              help=f"Number of templates (1–{settings.MAX_TOP_K}).")
@click.option("--category", help="Only templates of this category.")
@click.option("--subcategory", help="Only templates of this subcategory.")
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
def search(
    text: str, top_k: int, category: str | None, subcategory: str | None, model_key: str | None, as_json: bool
) -> None:
    """Top-k templates for a customer query."""
    from embedding_assets.lib.embedders import EmbeddingError
    from embedding_assets.lib.redaction import redact
    from embedding_assets.retrieval import TemplateRetriever

    if len(text) > settings.MAX_QUERY_CHARS:
        raise click.BadParameter(
            f"the query has {len(text)} characters; at most {settings.MAX_QUERY_CHARS} are accepted "
            "(the query model reads no more than its first 512 tokens)",
            param_hint="TEXT",
        )
    try:
        retriever = TemplateRetriever.load(settings.store_url(), model_key)
        hits = retriever.search(text, top_k=top_k, category=category, subcategory=subcategory)
    except (StoreError, ValueError, EmbeddingError) as exc:
        raise click.ClickException(redact(str(exc))) from None
    lines = [f"{h.rank}. [{h.score:.3f}] {h.template_id} · {h.category} / {h.subcategory}\n   Q: {h.question}\n"
             f"   A: {h.answer}" for h in hits]
    payload = {"query": text, "model_version": hits.identity.model_version, "store_id": hits.identity.store_id,
               "store_generation": hits.identity.store_generation, "hits": [h.as_dict() for h in hits]}
    _emit(payload, as_json, "\n".join(lines) or "no templates match")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@store_option
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--reload-interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between checks for a new publish.")
@click.option("--lexical-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Weight of the BM25 score added to the cosine similarity (0: dense only).")
@click.option("--search-timeout", default=15.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a search may take before it is answered 504.")
def serve(host: str, port: int, model_key: str | None, reload_interval: float,
          lexical_weight: float, search_timeout: float) -> None:
    """HTTP search service: /search, /healthz, /readyz, /docs; reloads on every new publish."""
    from embedding_assets.retrieval.service import serve as run_service

    run_service(settings.store_url(), host=host, port=port, model_version=model_key,
                reload_interval=reload_interval, lexical_weight=lexical_weight, search_timeout=search_timeout)


@main.command()
@click.option("--queries", "queries_path", type=click.Path(dir_okay=False),
              help="JSON file with a `validation_queries` list (query, correct_template_id, category, ...); default: "
                   f"{settings.VALIDATION_QUERIES_VAR}, else data/validation_queries.json of the project.")
@store_option
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--labels", "label_mode", type=click.Choice(["auto", "id", "row"]), default="auto", show_default=True,
              help="How correct_template_id names a template: its id, or `name_N` for the N-th data row "
                   "(0-based) of the sheet; auto picks id when any label is a stored id.")
@click.option("--lexical-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Weight of the BM25 score added to the cosine similarity (0: dense only).")
@click.option("--compare", "compare_key",
              help="A second model version of the store, evaluated on the same queries and shown beside the first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(queries_path: str | None, model_key: str | None, label_mode: str,
             lexical_weight: float, compare_key: str | None, as_json: bool) -> None:
    """Top-1/3/5 accuracy, MRR, per-category and per-kind results and misses on labelled queries."""
    from embedding_assets.lib.embedders import EmbeddingError
    from embedding_assets.retrieval import TemplateRetriever
    from embedding_assets.retrieval.evaluation import (
        QueriesFileError, compare, comparison_report, evaluate as run_evaluation, load_queries,
    )

    queries_path = queries_path or settings.validation_queries_path()
    url = settings.store_url()
    try:
        queries = load_queries(queries_path)
        results = [
            run_evaluation(
                TemplateRetriever.load(url, key, lexical_weight=lexical_weight), queries,
                queries_file=queries_path, label_mode=label_mode,
            )
            for key in ([model_key, compare_key] if compare_key else [model_key])
        ]
    except (StoreError, QueriesFileError, EmbeddingError) as exc:
        raise click.ClickException(str(exc)) from exc
    if compare_key:
        _emit(compare(*results), as_json, comparison_report(*results))
    else:
        _emit(results[0].as_dict(), as_json, results[0].report())


@main.command()
@click.option("--model", "model_key", help="Model version key (default: every active version).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model version.")
@faq_options
@store_option
def plan(model_key: str | None, as_json: bool) -> None:
    """What `materialize` would embed and what it would cost; sends nothing to any embeddings API."""
    from embedding_assets.lib.faq import FaqError
    from embedding_assets.lib.hashing import hash_version_templates
    from embedding_assets.lib.plan import build_change_plan, estimate_plan
    from embedding_assets.store import StoreNotFoundError
    from embedding_assets.store.base import mismatch_message

    limits = _budget_limits()
    versions = _selected_versions(model_key)
    try:
        templates = _read_faq()
    except FaqError as exc:
        raise click.ClickException(str(exc)) from None
    url = settings.store_url()
    try:
        store = open_store(url, create=False)
    except StoreNotFoundError:
        store = None
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        for version in versions:
            stored, published = store.published(version.key) if store else (None, {})
            change_plan = build_change_plan(
                hash_version_templates(templates, version), published,
                model_version=version.key, base_generation=stored.generation if stored else None,
            )
            estimate = estimate_plan(change_plan, version, store.cache(version) if store else None,
                                     stored.rows if stored else 0)
            stopped = None
            if stored and stored.fingerprint != version.fingerprint():
                stopped = mismatch_message(version, stored)
            payload = {
                "model_version": version.key,
                **change_plan.counts(),
                "base_generation": change_plan.base_generation,
                "first_build": estimate.first_build,
                **estimate.as_dict(),
                "max_reembed_share": limits.max_share,
                "max_reembed_tokens": limits.max_tokens,
                "refused": limits.refusal(estimate),
                "stopped": stopped,
                "store": redact_url(url),
            }
            _emit(payload, as_json, plan_text(payload))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if store is not None:
            store.close()


def _selected_versions(model_key: str | None):
    """The named model version, else every active one; an unknown key is a usage error."""
    from embedding_assets.lib.model_versions import load_model_versions

    versions = load_model_versions(settings.model_versions_path())
    if model_key is None:
        return [v for v in versions if v.active]
    if model_key in {v.key for v in versions}:
        return [v for v in versions if v.key == model_key]
    raise click.UsageError(f"unknown model version {model_key!r}; declared: {', '.join(v.key for v in versions)}")


def _read_faq():
    """The FAQ's templates, read as the pipeline's `faq` resource reads them (same settings, same reader)."""
    from embedding_assets.lib.faq import FaqColumns, read_faq

    try:
        found = settings.faq_workbook_settings()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    defaults = FaqColumns()
    columns = FaqColumns(**{
        name: found.get(f"{'id' if name == 'template_id' else name}_column", getattr(defaults, name))
        for name in FaqColumns.__dataclass_fields__
    })
    return read_faq(found["path"], columns, found.get("sheet"), found.get("header_row")).templates


def plan_text(p: dict) -> str:
    key = p["model_version"]
    if p["stopped"]:
        return f"{key}: a run would stop before embedding: {p['stopped']}"
    against = (f"against generation {p['base_generation']} ({p['published_templates']} published templates)"
               if not p["first_build"] else "first build: nothing published yet")
    views = ", ".join(f"{name} {count}" for name, count in p["texts_by_view"].items())
    lines = [
        f"{key}: {p['new']} new, {p['modified']} modified, {p['deleted']} deleted, {p['unchanged']} unchanged "
        f"({p['metadata_updated']} with updated fields), {against}",
        f"{key}: {p['texts_to_embed']} text(s) to embed{f' ({views})' if views else ''} for "
        f"{p['templates_to_embed']} template(s), {p['cache_hits']} of {p['texts_needed']} needed in the cache; "
        f"about {p['estimated_tokens']} token(s) in {p['estimated_requests']} request(s) of up to "
        f"{p['batch_size']} texts",
    ]
    if p["refused"]:
        lines.append(f"{key}: materialize would be refused by the budget guard: {p['refused']}; "
                     "approve it with `embedding-assets materialize --approve`")
    elif p["first_build"]:
        lines.append(f"{key}: budget guard: a first build is exempt from max_reembed_share")
    else:
        tokens = f", max_reembed_tokens {p['max_reembed_tokens']}" if p["max_reembed_tokens"] is not None else ""
        lines.append(f"{key}: budget guard: within the limits ({p['reembed_share']:.1%} of the published templates; "
                     f"max_reembed_share {p['max_reembed_share']:g}{tokens})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
