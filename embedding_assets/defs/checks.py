import hashlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import numpy as np

from embedding_assets.defs.assets import NO_TEXTS, faq_templates
from embedding_assets.defs.io_managers import inputs_key_of, verify_snapshot
from embedding_assets.defs.resources import FaqWorkbook, ModelCatalog, StoreResource, ValidationQueries
from embedding_assets.lib.embedding_base import EmbeddingCost
from embedding_assets.lib.faq import Template, missing_id_column_problems, templates_digest
from embedding_assets.lib.faq_checks import faq_content_problems
from embedding_assets.lib.hashing import hash_version_templates, hashed_digest
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.near_duplicates import (
    SearchState,
    UnreadableSearchState,
    load_search_state,
    save_search_state,
    search_near_duplicates,
)
from embedding_assets.lib.verification import LISTED, StoreReport
from embedding_assets.retrieval.evaluation import LabelledQuery, query_hash, top_changes
from embedding_assets.retrieval.memory import MemoryIndex
from embedding_assets.retrieval.quality import QualityReport, load_validation_queries, top_k_accuracy
from embedding_assets.store import EmbeddingStore, StoreError, StoreNotFoundError, StoreSnapshot, open_store


PREVIOUS_EVALUATIONS = 20  # of retrieval_quality, searched for one that saw the same store and queries
CHANGED_QUERIES_LISTED = 50  # queries whose top-k answer an edit changed, listed in the check's metadata
NEAR_DUPLICATES_LISTED = 50
NEAR_DUPLICATE_STATES = "near_duplicates"  # folder of the instance's storage with each version's last search


def _listed(items: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {item}" for item in items[:LISTED]) or "none")


@dg.asset_check(asset=faq_templates, blocking=True)
def faq_content(
    context: dg.AssetCheckExecutionContext,
    faq_templates,  # list[Template]; not annotated: Dagster would type-check every item of a list[...] input
    faq: FaqWorkbook,
    store: StoreResource,
) -> dg.AssetCheckResult:
    """No spreadsheet error text, no question repeated with another answer, no mass deletion of published templates."""
    try:
        opened = open_store(store.url, create=False)
    except StoreNotFoundError:
        opened = None
    try:
        published = opened.versions() if opened is not None else []
        store_id = opened.state().store_id if opened is not None else "none"
        generations = ", ".join(f"{v.key}@{v.generation}" for v in published)
        faq_state = (inputs_key_of(faq_templates) or templates_digest(faq_templates))[:16]
        evaluated_state = (
            f"faq {faq_state}; store {store_id}: {generations or 'nothing published'}; "
            f"id column {faq.id_column!r}, max removed share {faq.max_removed_share}"
        )
        reused = _reused_result(context, "faq_content", "faq_templates", evaluated_state)
        if reused is not None:
            return reused
        published_ids = {v.key: set(opened.published_hashes(v.key)[1]) for v in published}
    finally:
        if opened is not None:
            opened.close()
    problems = [
        *missing_id_column_problems(faq_templates, published_ids, faq.id_column),
        *faq_content_problems(faq_templates, published_ids, faq.max_removed_share),
    ]
    return dg.AssetCheckResult(
        passed=not problems,
        description=f"{len(problems)} problem(s) in the FAQ content" if problems else None,
        metadata={
            "templates": dg.MetadataValue.int(len(faq_templates)),
            "problems": dg.MetadataValue.int(len(problems)),
            "problem_list": _listed(problems),
            "evaluated_state": dg.MetadataValue.text(evaluated_state),
            "reevaluated": dg.MetadataValue.bool(True),
        },
    )


def _reused_result(
    context: dg.AssetCheckExecutionContext, check: str, asset: str, evaluated_state: str
) -> dg.AssetCheckResult | None:
    """A recent result of the check that saw the same `evaluated_state` (everything the check reads), kept;
    None when no recent evaluation did."""
    for previous in _recent_evaluations(context, check, asset):
        if getattr(previous.metadata.get("evaluated_state"), "value", None) == evaluated_state:
            context.log.info(f"{check}: what it reads is unchanged ({evaluated_state}); kept the last result")
            searched = {"rows_compared": dg.MetadataValue.int(0)} if "rows_compared" in previous.metadata else {}
            return dg.AssetCheckResult(
                passed=previous.passed, severity=previous.severity, description=previous.description,
                metadata={**previous.metadata, **searched, "reevaluated": dg.MetadataValue.bool(False)},
            )
    return None


def build_store_checks() -> list[dg.AssetChecksDefinition]:
    """The checks of the published store, in one step (`embedding_store_checks`) that reads a new
    generation once: a run of one model version (partition) checks that version, a run without a
    partition (the asset's Checks tab "Execute all") every published version. A check selected alone
    runs alone; an error in one check fails the step after the others have reported."""
    specs = [
        dg.AssetCheckSpec(
            name, asset="embedding_store", description=_first_line(check),
            additional_deps=["faq_templates"] if "faq_templates" in inspect.signature(check).parameters else None,
        )
        for name, check in STORE_CHECKS.items()
    ]

    @dg.multi_asset_check(
        name=STORE_CHECKS_STEP, specs=specs, can_subset=True,
        ins={"faq_templates": dg.AssetIn("faq_templates")},
    )
    def embedding_store_checks(
        context: dg.AssetCheckExecutionContext,
        faq_templates,  # list[Template]; not annotated: Dagster would type-check every item of a list[...] input
        models: ModelCatalog,
        store: StoreResource,
        validation_queries: ValidationQueries,
    ) -> Iterator[dg.AssetCheckResult]:
        """The published store's checks: its rows against the FAQ, retrieval quality, near duplicates."""
        inputs = {"faq_templates": faq_templates, "models": models, "store": store,
                  "validation_queries": validation_queries}
        selected = {key.name for key in context.selected_asset_check_keys}
        errors = []
        for name, check in STORE_CHECKS.items():
            if name not in selected:
                continue
            try:
                result = check(context, **{n: inputs[n] for n in inspect.signature(check).parameters if n in inputs})
            except Exception as exc:  # noqa: BLE001  (the other checks still report; the step fails below)
                context.log.error(f"{name} could not be evaluated: {type(exc).__name__}: {exc}")
                errors.append(exc)
                continue
            yield _named(result, name)
        if errors:
            raise errors[0]

    return [embedding_store_checks]


def store_matches_faq(
    context: dg.AssetCheckExecutionContext, faq_templates: list[Template], models: ModelCatalog, store: StoreResource,
) -> dg.AssetCheckResult:
    """Rows equal the FAQ's templates, hashes match, every vector has the version's dimension and is finite and non-zero."""
    with store.open() as opened:
        versions = _checked_versions(context, models, opened)
        store_id = opened.state().store_id
        evaluated_state = f"store {store_id} ({opened.change_marker() or 'generations'}): " + ", ".join(
            f"{version.key}@{getattr(opened.version(version.key), 'generation', None)} "
            f"faq {_hashed_state(faq_templates, version)}"
            for version in versions
        )
        reused = _reused_result(context, "store_matches_faq", "embedding_store", evaluated_state)
        if reused is not None:
            return reused
        reports = []
        for version in versions:
            try:
                snapshot = _published_snapshot(context, opened, version.key)
                reports.append(verify_snapshot(version, faq_templates, snapshot))
            except StoreError as exc:
                reports.append(StoreReport(version.key, len(faq_templates), unreadable=f"{version.key}: {exc}"))
    if not reports:
        return dg.AssetCheckResult(passed=False, description="no model version is published")
    problems = [problem for report in reports for problem in report.problems()]
    return dg.AssetCheckResult(
        passed=all(report.healthy for report in reports),
        description="; ".join(report.summary() for report in reports),
        metadata={
            "model_version": dg.MetadataValue.text(", ".join(version.key for version in versions)),
            "expected_rows": dg.MetadataValue.int(sum(report.expected_rows for report in reports)),
            "stored_rows": dg.MetadataValue.int(sum(report.stored_rows or 0 for report in reports)),
            "missing": dg.MetadataValue.int(sum(len(report.missing_ids) for report in reports)),
            "extra": dg.MetadataValue.int(sum(len(report.extra_ids) for report in reports)),
            "hash_mismatches": dg.MetadataValue.int(sum(len(report.hash_mismatch_ids) for report in reports)),
            "unhealthy_vectors": dg.MetadataValue.int(sum(len(report.unhealthy_ids) for report in reports)),
            "problem_list": _listed(problems),
            "evaluated_state": dg.MetadataValue.text(evaluated_state),
            "reevaluated": dg.MetadataValue.bool(True),
        },
    )


def retrieval_quality(
    context: dg.AssetCheckExecutionContext,
    validation_queries: ValidationQueries,
    models: ModelCatalog,
    store: StoreResource,
) -> dg.AssetCheckResult:
    """Top-k accuracy of the published version on the labelled validation queries."""
    try:
        return _retrieval_quality(context, validation_queries, models, store)
    except Exception as exc:  # a warning-level check reports its own failure; the publish stands
        context.log.warning(f"retrieval_quality could not be evaluated: {type(exc).__name__}: {exc}")
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"retrieval quality could not be evaluated ({type(exc).__name__}: {exc})",
            metadata={"error": dg.MetadataValue.text(f"{type(exc).__name__}: {exc}")},
        )


def near_duplicate_templates(
    context: dg.AssetCheckExecutionContext, models: ModelCatalog, store: StoreResource
) -> dg.AssetCheckResult:
    """No two different templates whose published vectors are nearly identical (stored vectors, no embedding)."""
    threshold = store.near_duplicate_cosine
    pairs, total, templates, rows_compared, incremental = [], 0, 0, 0, True
    with store.open() as opened:
        versions = _checked_versions(context, models, opened)
        generations = ", ".join(f"{v.key}@{getattr(opened.version(v.key), 'generation', None)}" for v in versions)
        evaluated_state = f"{opened.state().store_id}: {generations}; cosine >= {threshold}"
        reused = _reused_result(context, "near_duplicate_templates", "embedding_store", evaluated_state)
        if reused is not None:
            return reused
        for version in versions:
            snapshot = _published_snapshot(context, opened, version.key)
            if snapshot is None:
                raise StoreError(f"model version {version.key!r} has not been published")
            columns = snapshot.columns
            state_path = _near_duplicate_state_path(context, snapshot.store_id, version.key)
            search = search_near_duplicates(
                columns["template_id"], snapshot.matrix, threshold, _previous_search_state(context, state_path),
                limit=NEAR_DUPLICATES_LISTED,
            )
            _save_search_state(context, state_path, search.state)
            context.log.info(
                f"near_duplicate_templates: {version.key}: compared {search.rows_compared} of {len(snapshot)} "
                f"rows with all ({'incremental: ' if search.incremental else 'full search: '}{search.reason})"
            )
            found = search.found
            total += found.total
            templates += len(snapshot)
            rows_compared += search.rows_compared
            incremental = incremental and search.incremental
            pairs += [
                {"model_version": version.key, "first_id": columns["template_id"][i],
                 "first_question": columns["question"][i], "second_id": columns["template_id"][j],
                 "second_question": columns["question"][j], "cosine": round(cosine, 4)}
                for i, j, cosine in found.pairs
            ]
    pairs = sorted(pairs, key=lambda pair: -pair["cosine"])[:NEAR_DUPLICATES_LISTED]
    return dg.AssetCheckResult(
        passed=total == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"{total} pair(s) of templates with vectors at cosine >= {threshold}" if total
                     else f"no two templates at cosine >= {threshold}"),
        metadata={
            "threshold": dg.MetadataValue.float(threshold),
            "templates": dg.MetadataValue.int(templates),
            "pair_count": dg.MetadataValue.int(total),
            "pairs": dg.MetadataValue.json(pairs),
            "requests": dg.MetadataValue.int(0),
            "evaluated_state": dg.MetadataValue.text(evaluated_state),
            "reevaluated": dg.MetadataValue.bool(True),
            "incremental": dg.MetadataValue.bool(incremental and bool(versions)),
            "rows_compared": dg.MetadataValue.int(rows_compared),
        },
    )


STORE_CHECKS = {
    "store_matches_faq": store_matches_faq,
    "retrieval_quality": retrieval_quality,
    "near_duplicate_templates": near_duplicate_templates,
}
STORE_CHECKS_STEP = "embedding_store_checks"


def _first_line(check) -> str:
    return (check.__doc__ or "").strip().splitlines()[0]


def _named(result: dg.AssetCheckResult, name: str) -> dg.AssetCheckResult:
    """The result of one check of the step, named (a step of several checks names each result)."""
    return dg.AssetCheckResult(
        asset_key=dg.AssetKey("embedding_store"), check_name=name, passed=result.passed, severity=result.severity,
        description=result.description, metadata=result.metadata,
    )


def _hashed_state(templates: list[Template], version: ModelVersion) -> str:
    """What identifies the texts `version` embeds for `templates`: the parsed FAQ's inputs key and the
    version's templates for its texts when the key is known (nothing is hashed), else the texts' hashes."""
    faq_key = inputs_key_of(templates)
    if faq_key is None:
        return hashed_digest(hash_version_templates(templates, version))[:16]
    views = [(view.name, view.text_template) for view in version.views]
    return "key " + hashlib.sha256(f"{faq_key}\n{version.text_template!r}\n{views!r}".encode()).hexdigest()[:16]


def _near_duplicate_state_path(context: dg.AssetCheckExecutionContext, store_id: str, key: str) -> Path:
    """Where the last near-duplicate search of one store's model version is kept, in the instance's storage."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{store_id or 'store'}--{key}")
    return Path(context.instance.storage_directory()) / NEAR_DUPLICATE_STATES / f"{name}.npz"


def _previous_search_state(context: dg.AssetCheckExecutionContext, path: Path) -> SearchState | None:
    """The saved search, or None (a full search) when it is missing or cannot be used."""
    try:
        return load_search_state(path)
    except UnreadableSearchState as exc:
        if path.exists():
            context.log.warning(f"near_duplicate_templates: searching all pairs: {exc}")
        return None


def _save_search_state(context: dg.AssetCheckExecutionContext, path: Path, state: SearchState) -> None:
    try:
        save_search_state(path, state)
    except OSError as exc:  # the next search is full; this one's result stands
        context.log.warning(f"near_duplicate_templates: the search could not be kept at {path}: {exc}")


_LAST_SNAPSHOT: list = [None, None]  # (what identifies it, snapshot): a run's store checks read a version once


def _published_snapshot(
    context: dg.AssetCheckExecutionContext, opened: EmbeddingStore, key: str
) -> StoreSnapshot | None:
    """The version's published rows and vectors (None: not published), read once per run and generation
    (the run's own writes between its checks go to the cache, not to the published rows)."""
    info = opened.version(key)
    if info is None:
        return None
    identity = (context.run.run_id, opened.location, opened.state().store_id, key, info.generation)
    if _LAST_SNAPSHOT[0] != identity:
        _LAST_SNAPSHOT[:] = [None, None]  # the earlier one is not kept alive beside the new one
        snapshot = opened.snapshot(key)
        _LAST_SNAPSHOT[:] = [identity if snapshot.version.generation == info.generation else None, snapshot]
    return _LAST_SNAPSHOT[1]


def _checked_versions(
    context: dg.AssetCheckExecutionContext, models: ModelCatalog, opened: EmbeddingStore
) -> list[ModelVersion]:
    """The run's model version (partition), or every declared version that is published when no partition is chosen."""
    if context.has_partition_key:
        return [models.get(context.partition_key)]
    published = {stored.key for stored in opened.versions()}
    return [version for version in models.versions() if version.key in published]


def _retrieval_quality(
    context: dg.AssetCheckExecutionContext, validation_queries: ValidationQueries, models: ModelCatalog,
    store: StoreResource,
) -> dg.AssetCheckResult:
    try:
        raw = Path(validation_queries.path).read_bytes()
        queries = load_validation_queries(validation_queries.path)
    except (OSError, ValueError, KeyError) as exc:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"validation queries {validation_queries.path} cannot be read ({type(exc).__name__}: {exc})",
            metadata={"requests": dg.MetadataValue.int(0)},
        )
    with store.open() as opened:
        versions = _checked_versions(context, models, opened)
        generations = {version.key: getattr(opened.version(version.key), "generation", None) for version in versions}
    fingerprint = hashlib.sha256(
        raw + f"\ntop_k={validation_queries.top_k}\nmin={validation_queries.min_accuracy}".encode()
    ).hexdigest()[:16]
    evaluated_state = ", ".join(f"{key}@{generation}" for key, generation in generations.items())
    recent = _recent_evaluations(context)
    previous = _previous_evaluation(recent, evaluated_state, fingerprint)
    if previous is not None:
        context.log.info(f"retrieval_quality: store {evaluated_state} and queries unchanged; kept the last result")
        metadata = {
            **previous.metadata, "requests": dg.MetadataValue.int(0), "reevaluated": dg.MetadataValue.bool(False),
            "changed_queries": dg.MetadataValue.json([]), "changed_query_count": dg.MetadataValue.int(0),
            "impact_baseline": dg.MetadataValue.text(f"{evaluated_state} (unchanged)"),
        }
        return dg.AssetCheckResult(
            passed=previous.passed, severity=dg.AssetCheckSeverity.WARN, description=previous.description,
            metadata=metadata,
        )
    outcomes = [_evaluate_version(context, version, queries, validation_queries, models, store) for version in versions]
    requests = sum(outcome.requests for outcome in outcomes)
    rankings = {o.key: {"generation": generations[o.key], "top_ids": o.report.top_ids} for o in outcomes}
    changes, baselines = _edit_impact(recent, rankings, fingerprint, queries, validation_queries.top_k)
    state = {
        "evaluated_state": dg.MetadataValue.text(evaluated_state),
        "queries_fingerprint": dg.MetadataValue.text(fingerprint),
        "requests": dg.MetadataValue.int(requests),
        "query_vectors_embedded": dg.MetadataValue.int(sum(outcome.embedded for outcome in outcomes)),
        "reevaluated": dg.MetadataValue.bool(True),
        "top_ids_by_version": dg.MetadataValue.json(rankings),
        "changed_queries": dg.MetadataValue.json(changes[:CHANGED_QUERIES_LISTED]),
        "changed_query_count": dg.MetadataValue.int(len(changes)),
        "impact_baseline": dg.MetadataValue.text(", ".join(baselines) or "none: the first evaluation of these queries"),
    }
    reports = [outcome.report for outcome in outcomes if outcome.report.accuracy is not None]
    if not reports:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="no validation query names a published template" if versions else "no model version is published",
            metadata=state,
        )
    evaluated = sum(report.evaluated for report in reports)
    accuracy = sum(report.hits for report in reports) / evaluated
    top_k = validation_queries.top_k
    return dg.AssetCheckResult(
        passed=all(report.accuracy >= validation_queries.min_accuracy for report in reports),
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(
            f"{outcome.key}: top-{top_k} accuracy {outcome.report.accuracy:.1%} on {outcome.report.evaluated} queries"
            for outcome in outcomes if outcome.report.accuracy is not None
        ) + f" (threshold {validation_queries.min_accuracy:.0%})",
        metadata={
            f"top{top_k}_accuracy": dg.MetadataValue.float(round(accuracy, 4)),
            "threshold": dg.MetadataValue.float(validation_queries.min_accuracy),
            "queries_evaluated": dg.MetadataValue.int(evaluated),
            "queries_without_template": dg.MetadataValue.int(sum(len(r.without_template) for r in reports)),
            "missed_queries": dg.MetadataValue.json([m for r in reports for m in r.misses][:LISTED]),
            **state,
        },
    )


@dataclass(frozen=True)
class _VersionQuality:
    key: str
    report: QualityReport
    requests: int
    embedded: int


def _evaluate_version(
    context: dg.AssetCheckExecutionContext, version: ModelVersion, queries: list,
    validation_queries: ValidationQueries, models: ModelCatalog, store: StoreResource,
) -> _VersionQuality:
    """One version's accuracy, with query vectors from the store's cache and only new queries embedded."""
    with store.open() as opened:
        published_ids = set(opened.published_hashes(version.key)[1])
        answerable = [q for q in queries if q.template_id in published_ids]
        cache = opened.cache(version)
        hashes = {q.query: query_hash(q.query) for q in answerable}
        vectors = cache.get(sorted(set(hashes.values())))
        missing = sorted({text for text, digest in hashes.items() if digest not in vectors})
        requests = 0
        if missing:
            embedder = models.embedder(version)
            before = replace(embedder.cost) if isinstance(getattr(embedder, "cost", None), EmbeddingCost) else None
            fresh = {hashes[text]: np.asarray(embedder.embed_query(text), dtype=np.float32) for text in missing}
            cache.put(fresh)
            vectors.update(fresh)
            requests = embedder.cost.since(before).requests if before is not None else len(missing)
    if not answerable:  # no query names a published template: nothing to search, the retriever is not loaded
        report = top_k_accuracy(lambda text, k: [], queries, published_ids, top_k=validation_queries.top_k)
        return _VersionQuality(version.key, report, requests, len(missing))
    with store.open() as opened:
        index = MemoryIndex(store.url, _published_snapshot(context, opened, version.key), NO_TEXTS)
    report = top_k_accuracy(
        lambda text, k: [
            hit.template_id for hit in index.search(text, k, None, None, query_vector=vectors[hashes[text]])
        ],
        queries,
        published_ids=published_ids,
        top_k=validation_queries.top_k,
    )
    return _VersionQuality(version.key, report, requests, len(missing))


def _edit_impact(
    recent: list[dg.AssetCheckEvaluation], rankings: dict[str, dict], fingerprint: str, queries: list, top_k: int
) -> tuple[list[dict], list[str]]:
    """The queries whose top-k answer changed since each version's last evaluation on the same queries,
    and the evaluations compared (`key@generation -> key@generation`)."""
    labelled = [LabelledQuery(q.query_id, q.query, q.template_id) for q in queries]
    changes, baselines = [], []
    for key, ranking in rankings.items():
        previous = _previous_ranking(recent, key, fingerprint)
        if previous is None:
            continue
        baselines.append(f"{key}@{previous['generation']} -> {key}@{ranking['generation']}")
        changes += [{"model_version": key, **change}
                    for change in top_changes(previous["top_ids"], ranking["top_ids"], labelled, k=top_k)]
    return changes, baselines


def _previous_ranking(recent: list[dg.AssetCheckEvaluation], key: str, fingerprint: str) -> dict | None:
    """The per-query top-k ids of the version's latest evaluation on the same queries."""
    for evaluation in recent:
        values = {name: getattr(value, "value", value) for name, value in evaluation.metadata.items()}
        rankings = values.get("top_ids_by_version")
        if values.get("queries_fingerprint") == fingerprint and isinstance(rankings, dict) and key in rankings:
            return rankings[key]
    return None


def _recent_evaluations(
    context: dg.AssetCheckExecutionContext, check: str = "retrieval_quality", asset: str = "embedding_store"
) -> list[dg.AssetCheckEvaluation]:
    """The check's latest evaluations, newest first."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    records = context.instance.event_log_storage.get_asset_check_execution_history(key, limit=PREVIOUS_EVALUATIONS)
    evaluations = []
    for record in records:
        if record.event is None or record.event.dagster_event is None:
            continue
        evaluation = record.event.dagster_event.event_specific_data
        if isinstance(evaluation, dg.AssetCheckEvaluation):
            evaluations.append(evaluation)
    return evaluations


def _previous_evaluation(
    recent: list[dg.AssetCheckEvaluation], evaluated_state: str, fingerprint: str
) -> dg.AssetCheckEvaluation | None:
    """A recent evaluation of the check that saw the same store generations and queries."""
    for evaluation in recent:
        values = {name: getattr(value, "value", value) for name, value in evaluation.metadata.items()}
        if values.get("evaluated_state") == evaluated_state and values.get("queries_fingerprint") == fingerprint:
            return evaluation
    return None
