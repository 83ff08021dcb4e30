import dagster as dg
from pydantic import Field

from embedding_assets.defs.resources import ModelCatalog, StoreResource, ValidationQueries
from embedding_assets.lib.embedders import EmbeddingError
from embedding_assets.retrieval.evaluation import QueriesFileError, load_queries
from embedding_assets.retrieval.promotion import PromotionReview, declared_or_stored, review_promotion


class PromoteConfig(dg.Config):
    model_version: str = Field(description="Key of the published model version that readers should use.")
    force: bool = Field(
        default=False,
        description="Promote even when the version's top-3 on the labelled queries is lower than the current one's.",
    )


def review_metadata(review: PromotionReview) -> dict[str, dg.MetadataValue]:
    """The quality review as metadata: both top-3 scores and every query whose top-3 answer changed."""
    metadata = {
        "queries_file": dg.MetadataValue.text(review.queries_file),
        "changed_queries": dg.MetadataValue.json(review.changes),
        "changed_query_count": dg.MetadataValue.int(len(review.changes)),
        "requests": dg.MetadataValue.int(review.requests),
        "query_vectors_embedded": dg.MetadataValue.int(review.query_vectors_embedded),
        "review": dg.MetadataValue.text(review.summary()),
    }
    if review.compared:
        metadata["previous_top3"] = dg.MetadataValue.float(round(review.current_score.top3, 4))
        metadata["candidate_top3"] = dg.MetadataValue.float(round(review.candidate_score.top3, 4))
    return metadata


@dg.op
def promote_version(
    context: dg.OpExecutionContext, config: PromoteConfig, store: StoreResource, models: ModelCatalog,
    validation_queries: ValidationQueries,
) -> str:
    """Switch the store's current model version in one transaction, unless its top-3 is lower."""
    with store.open() as opened:
        try:
            review = review_promotion(
                opened, store.url, config.model_version, load_queries(validation_queries.path),
                queries_file=validation_queries.path, model_version=declared_or_stored(models.versions()),
                embedder=models.embedder,
            )
        except (QueriesFileError, EmbeddingError) as exc:
            if not config.force:
                raise dg.Failure(description=f"cannot review the promotion of {config.model_version}: {exc}; "
                                 "promote it anyway with the op config force: true") from exc
            context.log.warning(f"{config.model_version}: promoted without a quality review ({exc})")
            review = PromotionReview(config.model_version, opened.current_version(), validation_queries.path,
                                     note=f"not reviewed: {exc}")
        context.log.info(review.summary())
        if review.worse and not config.force:
            raise dg.Failure(description=review.refusal("the op config force: true"),
                             metadata=review_metadata(review))
        previous = opened.current_version()
        info = opened.promote(config.model_version)
        generation = opened.generation()
    context.log.info(f"current model version: {previous or 'none'} -> {info.key} ({info.rows} rows)")
    context.add_output_metadata(
        {
            "previous": dg.MetadataValue.text(previous or ""),
            "current": dg.MetadataValue.text(info.key),
            "rows": dg.MetadataValue.int(info.rows),
            "store_generation": dg.MetadataValue.int(generation),
            "forced": dg.MetadataValue.bool(config.force and review.worse),
            **review_metadata(review),
        }
    )
    return info.key


@dg.job(
    name="promote_model_version",
    description="Make a published model version the one readers use, unless its top-3 on the labelled queries is lower.",
)
def promote_model_version_job():
    promote_version()
