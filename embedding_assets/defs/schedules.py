import dagster as dg

from embedding_assets import settings
from embedding_assets.defs.jobs import embed_faq_job
from embedding_assets.defs.resources import FaqWorkbook, ModelCatalog, StoreResource
from embedding_assets.defs.sensors import TRIGGER_TAG
from embedding_assets.lib.faq import FaqError
from embedding_assets.lib.integrity import verify_store

DRIFT_TAG = "embedding_assets/drift"
REPAIR_CONFIG = {"ops": {"change_plan": {"config": {"repair": True}}}}


@dg.schedule(
    job=embed_faq_job,
    cron_schedule=settings.verify_cron(),
    execution_timezone=settings.verify_timezone(),
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def store_verification(
    context: dg.ScheduleEvaluationContext, faq: FaqWorkbook, models: ModelCatalog, store: StoreResource
) -> dg.SkipReason | list[dg.RunRequest]:
    """Verifies every active version's store against the FAQ; re-materializes, repairing, the ones that drifted."""
    try:
        templates = faq.read()
    except FaqError as exc:
        return dg.SkipReason(f"cannot verify the store: {exc}")
    with store.open() as opened:
        reports = [verify_store(opened, version, templates) for version in models.versions() if version.active]
    drifted = [report for report in reports if not report.healthy]
    if not drifted:
        return dg.SkipReason("store verified: " + "; ".join(report.summary() for report in reports))
    for report in drifted:
        context.log.warning(report.summary())
    return [
        dg.RunRequest(
            partition_key=report.model_version,
            run_config=REPAIR_CONFIG,
            tags={TRIGGER_TAG: "store-drift", DRIFT_TAG: report.summary()[:200]},
        )
        for report in drifted
    ]
