import warnings

import dagster as dg

from embedding_assets.defs.assets import faq_templates
from embedding_assets.defs.resources import FaqWorkbook, ModelCatalog, StoreResource, ValidationQueries
from embedding_assets.lib.faq import FaqError, Template, missing_id_column_problems
from embedding_assets.lib.faq_checks import faq_content_problems
from embedding_assets.lib.verification import LISTED, compare_table
from embedding_assets.lib.version_table import VersionTable
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.quality import load_validation_queries, top_k_accuracy
from embedding_assets.store import StoreNotFoundError, open_store


def _listed(items: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {item}" for item in items[:LISTED]) or "none")


@dg.asset_check(asset=faq_templates, blocking=True)
def faq_content(faq_templates: list[Template], faq: FaqWorkbook, store: StoreResource) -> dg.AssetCheckResult:
    """No spreadsheet error text, no question repeated with another answer, no mass deletion of published templates."""
    published_ids = {}
    try:
        opened = open_store(store.url, create=False)
    except StoreNotFoundError:
        opened = None
    if opened is not None:
        try:
            published_ids = {v.key: set(opened.published(v.key)[1]) for v in opened.versions()}
        finally:
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
        },
    )


def build_store_checks(partitions_def: dg.PartitionsDefinition) -> list[dg.AssetChecksDefinition]:
    """The per-model-version checks of the published store (partitioned checks: a preview feature, pinned)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=dg.PreviewWarning, message="Specifying a partitions_def")
        return _store_checks(partitions_def)


def _store_checks(partitions_def: dg.PartitionsDefinition) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset="embedding_store", partitions_def=partitions_def)
    def store_matches_faq(
        context: dg.AssetCheckExecutionContext, embedding_store: VersionTable, faq: FaqWorkbook, models: ModelCatalog
    ) -> dg.AssetCheckResult:
        """Rows equal the FAQ's templates, hashes match, every vector has the version's dimension and is finite and non-zero."""
        version = models.get(context.partition_key)
        try:
            templates = faq.read()
        except FaqError as exc:
            return dg.AssetCheckResult(passed=False, description=f"cannot verify against the FAQ: {exc}")
        report = compare_table(version, templates, embedding_store)
        return dg.AssetCheckResult(
            passed=report.healthy,
            description=report.summary(),
            metadata={
                "model_version": dg.MetadataValue.text(version.key),
                "expected_rows": dg.MetadataValue.int(report.expected_rows),
                "stored_rows": dg.MetadataValue.int(report.stored_rows or 0),
                "missing": dg.MetadataValue.int(len(report.missing_ids)),
                "extra": dg.MetadataValue.int(len(report.extra_ids)),
                "hash_mismatches": dg.MetadataValue.int(len(report.hash_mismatch_ids)),
                "unhealthy_vectors": dg.MetadataValue.int(len(report.unhealthy_ids)),
                "problem_list": _listed(report.problems()),
            },
        )

    @dg.asset_check(asset="embedding_store", partitions_def=partitions_def)
    def retrieval_quality(
        context: dg.AssetCheckExecutionContext, validation_queries: ValidationQueries, store: StoreResource
    ) -> dg.AssetCheckResult:
        """Top-k accuracy of the published version on the labelled validation queries."""
        try:
            queries = load_validation_queries(validation_queries.path)
        except (OSError, ValueError, KeyError) as exc:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"validation queries {validation_queries.path} cannot be read ({type(exc).__name__}: {exc})",
            )
        with store.open() as opened:
            published_ids = set(opened.published(context.partition_key)[1])
        retriever = TemplateRetriever.load(store.url, model_version=context.partition_key)
        report = top_k_accuracy(
            lambda text, k: [hit.template_id for hit in retriever.search(text, top_k=k)],
            queries,
            published_ids=published_ids,
            top_k=validation_queries.top_k,
        )
        accuracy = report.accuracy
        metadata = {
            f"top{report.top_k}_accuracy": dg.MetadataValue.float(round(accuracy, 4) if accuracy is not None else 0.0),
            "threshold": dg.MetadataValue.float(validation_queries.min_accuracy),
            "queries_evaluated": dg.MetadataValue.int(report.evaluated),
            "queries_without_template": dg.MetadataValue.int(len(report.without_template)),
            "missed_queries": dg.MetadataValue.json(report.misses[:LISTED]),
        }
        if accuracy is None:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description="no validation query names a published template",
                metadata=metadata,
            )
        return dg.AssetCheckResult(
            passed=accuracy >= validation_queries.min_accuracy,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"top-{report.top_k} accuracy {accuracy:.1%} on {report.evaluated} queries "
            f"(threshold {validation_queries.min_accuracy:.0%})",
            metadata=metadata,
        )

    return [store_matches_faq, retrieval_quality]
