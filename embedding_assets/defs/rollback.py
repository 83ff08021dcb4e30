import dagster as dg
from pydantic import Field

from embedding_assets.defs.io_managers import writer_lock
from embedding_assets.defs.resources import StoreResource

ROLLBACK_JOB = "rollback_model_version"


class RollbackConfig(dg.Config):
    model_version: str = Field(description="Key of the published model version to return to its previous generation.")


@dg.op
def rollback_version(context: dg.OpExecutionContext, config: RollbackConfig, store: StoreResource) -> int:
    """Publish the version's previous generation again, in one transaction, as a new generation."""
    with store.open() as opened, writer_lock(opened, config.model_version, store.writer_lock_timeout, context.log):
        result = opened.rollback(config.model_version)
    context.log.info(
        f"{result.model_version}: restored generation {result.restored_generation} as generation "
        f"{result.generation} ({result.rows} rows), replacing generation {result.replaced_generation}"
    )
    context.add_output_metadata(
        {
            "model_version": dg.MetadataValue.text(result.model_version),
            "store_generation": dg.MetadataValue.int(result.generation),
            "restored_generation": dg.MetadataValue.int(result.restored_generation),
            "replaced_generation": dg.MetadataValue.int(result.replaced_generation),
            "rows": dg.MetadataValue.int(result.rows),
            "still_restorable": dg.MetadataValue.text(", ".join(map(str, result.restorable)) or "none"),
        }
    )
    return result.generation


@dg.job(
    name=ROLLBACK_JOB,
    description="Publish a model version's previous generation again (its exact rows and vectors) as a new generation.",
)
def rollback_model_version_job():
    rollback_version()
