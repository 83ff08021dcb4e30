import dagster as dg
from pydantic import Field

from embedding_assets.defs.resources import StoreResource


class PromoteConfig(dg.Config):
    model_version: str = Field(description="Key of the published model version that readers should use.")


@dg.op
def promote_version(context: dg.OpExecutionContext, config: PromoteConfig, store: StoreResource) -> str:
    """Switch the store's current model version in one transaction."""
    with store.open() as opened:
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
        }
    )
    return info.key


@dg.job(name="promote_model_version", description="Make a published model version the one readers use.")
def promote_model_version_job():
    promote_version()
