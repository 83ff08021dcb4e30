import dagster as dg

from embedding_assets.defs.resources import FaqWorkbook
from embedding_assets.lib.faq_watch import FileState, observe, run_key
from embedding_assets.lib.model_versions import ModelVersionCatalog

TRIGGER_TAG = "embedding_assets/trigger"
CONTENT_TAG = "embedding_assets/faq_sha256"


def build_faq_sensor(
    job, catalog: ModelVersionCatalog, interval_seconds: int
) -> dg.SensorDefinition:
    """The sensor that runs the job for every active model version of `catalog` when the FAQ changes."""

    @dg.sensor(job=job, minimum_interval_seconds=interval_seconds, default_status=dg.DefaultSensorStatus.RUNNING)
    def faq_changed(context: dg.SensorEvaluationContext, faq: FaqWorkbook) -> dg.SensorResult:
        """Runs embed_faq for every active model version (partition) when the FAQ file's content changes."""
        seen = observe(faq.path, FileState.from_cursor(context.cursor))
        cursor = seen.state.to_cursor() if seen.state else context.cursor
        if not seen.changed:
            return dg.SensorResult(skip_reason=dg.SkipReason(seen.reason), cursor=cursor)
        context.log.info(seen.reason)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    partition_key=version.key,
                    run_key=run_key(seen.state, version.key),
                    tags={TRIGGER_TAG: "faq-changed", CONTENT_TAG: seen.state.sha256},
                )
                for version in catalog.active()
            ],
            cursor=cursor,
        )

    return faq_changed
