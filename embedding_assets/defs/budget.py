import warnings

import dagster as dg

from embedding_assets.defs.resources import EmbeddingBudget, ModelCatalog, StoreResource
from embedding_assets.lib.plan import ChangePlan, PlanEstimate, estimate_plan

BUDGET_CHECK = "reembed_budget"
APPROVAL_HINT = (
    "to approve it, run `embedding-assets materialize --approve` (or `--force`), or launch the run with "
    "`approved: true` (or a higher `max_reembed_share` / `max_reembed_tokens`) in the `budget` resource's config"
)


def estimate_metadata(estimate: PlanEstimate) -> dict[str, dg.MetadataValue]:
    """What a run of the plan embeds and its estimated cost: the numbers `embedding-assets plan` prints."""
    metadata = {
        "published_templates": dg.MetadataValue.int(estimate.published_templates),
        "cache_hits": dg.MetadataValue.int(estimate.cache_hits),
        "texts_to_embed": dg.MetadataValue.int(estimate.texts_to_embed),
        "templates_to_embed": dg.MetadataValue.int(estimate.templates_to_embed),
        "estimated_tokens": dg.MetadataValue.int(estimate.tokens),
        "estimated_requests": dg.MetadataValue.int(estimate.requests),
    }
    if estimate.share is not None:
        metadata["reembed_share"] = dg.MetadataValue.float(round(estimate.share, 4))
    if estimate.texts_by_view:
        metadata["texts_to_embed_by_view"] = dg.MetadataValue.json(estimate.texts_by_view)
    return metadata


def build_budget_check(partitions_def: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    """The blocking check that stops a run embedding past its budget, partitioned like change_plan."""

    def reembed_budget(
        context: dg.AssetCheckExecutionContext,
        change_plan: ChangePlan,
        models: ModelCatalog,
        store: StoreResource,
        budget: EmbeddingBudget,
    ) -> dg.AssetCheckResult:
        """The run embeds no more than max_reembed_share of a published version's templates and max_reembed_tokens, unless approved."""
        limits = budget.limits()
        version = models.get(change_plan.model_version)
        with store.open() as opened:
            stored = opened.version(version.key)
            estimate = estimate_plan(change_plan, version, opened.cache(version), stored.rows if stored else 0)
        refusal = limits.refusal(estimate)
        approved = budget.approved or change_plan.rebuild
        metadata = {
            "model_version": dg.MetadataValue.text(version.key),
            **estimate_metadata(estimate),
            "max_reembed_share": dg.MetadataValue.float(limits.max_share),
            "approved": dg.MetadataValue.bool(refusal is not None and approved),
        }
        if limits.max_tokens is not None:
            metadata["max_reembed_tokens"] = dg.MetadataValue.int(limits.max_tokens)
        if refusal is None:
            description = f"{version.key}: within the budget ({estimate.texts_to_embed} text(s) to embed)"
        elif approved:
            description = f"{version.key}: approved past the budget: {refusal}"
            context.log.warning(description)
        else:
            description = f"{version.key}: {refusal}; {APPROVAL_HINT}"
        return dg.AssetCheckResult(passed=refusal is None or approved, description=description, metadata=metadata)

    with warnings.catch_warnings():  # a partitioned check is a preview in Dagster 1.13; it warns on every load
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(asset="change_plan", name=BUDGET_CHECK, blocking=True, partitions_def=partitions_def)(
            reembed_budget
        )
