"""`embedding-assets`: materialize the store, inspect it, search it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _emit(payload: object, as_json: bool, text: str) -> None:
    click.echo(json.dumps(payload, ensure_ascii=False) if as_json else text)


def run_failure_message(result) -> str:
    """The user-facing message of the first failed step, without Dagster's wrapping."""
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error.cause is not None and error.cls_name in DAGSTER_WRAPPERS:
                error = error.cause
            message = error.message.strip()
            prefix = f"{error.cls_name}: "
            if prefix in message:
                message = message.split(prefix, 1)[1]
            return f"step {event.step_key} failed: {message}"
    return "the run failed"


@click.group()
def main() -> None:
    """Keep a FAQ's embeddings fresh, cheap and safe to serve."""


@main.command()
@click.option("--model", "model_key", help="Model version key (default: every active version).")
@click.option("--force", is_flag=True, help="Rebuild from scratch: re-embed every template, bypassing the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model version.")
@click.option("--faq", "faq_path", help=f"The FAQ file (default: {settings.FAQ_PATH_VAR}, the config's [faq] path, {settings.DEFAULT_FAQ_PATH}).")
@click.option("--faq-sheet", help="The FAQ's sheet (default: the active sheet when visible, else the first visible one).")
def materialize(model_key: str | None, force: bool, as_json: bool, faq_path: str | None, faq_sheet: str | None) -> None:
    """Run the embedding job in DAGSTER_HOME's instance (the runs show in the UI)."""
    settings.dagster_home()
    for variable, value in ((settings.FAQ_PATH_VAR, faq_path), (settings.FAQ_SHEET_VAR, faq_sheet)):
        if value:
            os.environ[variable] = value
    import dagster as dg

    from embedding_assets.definitions import defs
    from embedding_assets.defs.jobs import EMBED_FAQ_JOB
    from embedding_assets.lib.model_versions import load_model_versions

    versions = load_model_versions(settings.model_versions_path())
    if model_key is None:
        keys = [v.key for v in versions if v.active]
    elif model_key in {v.key for v in versions}:
        keys = [model_key]
    else:
        raise click.UsageError(f"unknown model version {model_key!r}; declared: {', '.join(v.key for v in versions)}")
    job = defs().resolve_job_def(EMBED_FAQ_JOB)
    run_config = {**QUIET_LOGS, "ops": {"change_plan": {"config": {"force": force}}}}
    failed = False
    with dg.DagsterInstance.get() as instance:
        for key in keys:
            result = job.execute_in_process(
                instance=instance, partition_key=key, run_config=run_config, raise_on_error=False
            )
            if not result.success:
                failed = True
                click.echo(f"{key}: {run_failure_message(result)}", err=True)
                click.echo(f"{key}: the published store is unchanged (run {result.run_id})", err=True)
                continue
            summary, text = _run_summary(key, result)
            _emit(summary, as_json, text)
    if failed:
        sys.exit(1)


def _run_summary(key: str, result) -> tuple[dict, str]:
    plan = result.output_for_node("change_plan")
    published = {}
    embedded = calls = embed_ms = 0
    cost: dict = {"requests": 0, "inputs": 0, "tokens": None, "retries": 0}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        name = materialization.asset_key.to_user_string()
        values = {k: v.value for k, v in materialization.metadata.items()}
        if name == "template_embeddings":
            embedded, calls, embed_ms = values["embedded"], values["embedding_calls"], values["embed_ms"]
            cost = {item: values.get(item) for item in cost}
        elif name == "embedding_store":
            published = values
    summary = {
        "model_version": key,
        **plan.counts(),
        "embedded": embedded,
        "embedding_calls": calls,
        "embed_ms": embed_ms,
        **cost,
        "rows": published["rows"],
        "generation": published["generation"],
        "published": published["published"],
        "current": published["current_version"],
        "store": published["store"],
        "run_id": result.run_id,
    }
    c = summary
    text = (
        f"{key}: {c['new']} new, {c['modified']} modified, {c['deleted']} deleted, {c['unchanged']} unchanged "
        f"({c['metadata_updated']} with updated fields); embedded {c['embedded']} text(s) in "
        f"{c['embedding_calls']} call(s); {c['rows']} rows at generation {c['generation']}"
        f"{' (current)' if c['current'] else ''} in {c['store']}\n"
        f"{key}: cost {c['requests']} request(s), {c['inputs']} input(s), "
        f"{'n/a' if c['tokens'] is None else c['tokens']} token(s), {c['retries']} retries, "
        f"{c['embed_ms'] / 1000:.2f} s"
    )
    return summary, text


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
    _emit(payload, as_json, "\n".join(lines))


@main.group()
def versions() -> None:
    """List, promote and prune the model versions published in the store."""


VERSION_COLUMNS = ("model_version", "provider", "model", "dimension", "rows", "created_at", "published_at",
                   "generation", "current")


@versions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def versions_list(as_json: bool) -> None:
    """Every published version; the current one is marked with *."""
    with _existing_store() as store:
        rows = [v.as_dict() for v in store.versions()]
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
def versions_promote(key: str) -> None:
    """Make a published version the one readers use (one transaction)."""
    with _existing_store(write=True) as store:
        previous = store.current_version()
        info = store.promote(key)
    if previous == key:
        click.echo(f"{key} is already the current version ({info.rows} rows)")
    else:
        click.echo(f"{key} is now the current version ({info.rows} rows); it was {previous or 'none'}")


@versions.command("prune")
@click.argument("key")
def versions_prune(key: str) -> None:
    """Delete a version that is not current, with its cached vectors."""
    with _existing_store(write=True) as store:
        removed = store.prune(key)
    click.echo(f"pruned {key}: {removed} rows removed")


@main.command()
@click.argument("text")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 100), help="Number of templates.")
@click.option("--category", help="Only templates of this category.")
@click.option("--subcategory", help="Only templates of this subcategory.")
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
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
    payload = {"query": text, "model_version": retriever.info()["model_version"], "hits": [h.as_dict() for h in hits]}
    _emit(payload, as_json, "\n".join(lines) or "no templates match")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--store", "store_url", help="Store URL (default: EMBEDDING_ASSETS_STORE or data/embeddings.db).")
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--reload-interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between checks for a new publish.")
@click.option("--lexical-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Weight of the BM25 score added to the cosine similarity (0: dense only).")
@click.option("--search-timeout", default=15.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a search may take before it is answered 504.")
def serve(host: str, port: int, store_url: str | None, model_key: str | None, reload_interval: float,
          lexical_weight: float, search_timeout: float) -> None:
    """HTTP search service: /search, /healthz, /readyz, /docs; reloads on every new publish."""
    from embedding_assets.retrieval.service import serve as run_service

    run_service(store_url or settings.store_url(), host=host, port=port, model_version=model_key,
                reload_interval=reload_interval, lexical_weight=lexical_weight, search_timeout=search_timeout)


@main.command()
@click.option("--queries", "queries_path", required=True, type=click.Path(dir_okay=False),
              help="JSON file with a `validation_queries` list (query, correct_template_id, category, ...).")
@click.option("--store", "store_url", help="Store URL (default: EMBEDDING_ASSETS_STORE or data/embeddings.db).")
@click.option("--model", "model_key", help="Model version (default: the store's current one).")
@click.option("--labels", "label_mode", type=click.Choice(["auto", "id", "row"]), default="auto", show_default=True,
              help="How correct_template_id names a template: its id, or `name_N` for the N-th data row "
                   "(0-based) of the sheet; auto picks id when any label is a stored id.")
@click.option("--lexical-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Weight of the BM25 score added to the cosine similarity (0: dense only).")
@click.option("--compare", "compare_key",
              help="A second model version of the store, evaluated on the same queries and shown beside the first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(queries_path: str, store_url: str | None, model_key: str | None, label_mode: str,
             lexical_weight: float, compare_key: str | None, as_json: bool) -> None:
    """Top-1/3/5 accuracy, MRR, per-category and per-kind results and misses on labelled queries."""
    from embedding_assets.lib.embedders import EmbeddingError
    from embedding_assets.retrieval import TemplateRetriever
    from embedding_assets.retrieval.evaluation import (
        QueriesFileError, compare, comparison_report, evaluate as run_evaluation, load_queries,
    )

    url = store_url or settings.store_url()
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


if __name__ == "__main__":
    main()
