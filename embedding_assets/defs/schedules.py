import dagster as dg

from embedding_assets.defs.io_managers import verify_published
from embedding_assets.defs.resources import FaqWorkbook, StoreResource
from embedding_assets.defs.sensors import TRIGGER_TAG
from embedding_assets.lib.faq import FaqError
from embedding_assets.lib.model_versions import ModelVersionCatalog

DRIFT_TAG = "embedding_assets/drift"
REPAIR_CONFIG = {"ops": {"change_plan": {"config": {"repair": True}}}}


def build_store_verification(
    job, catalog: ModelVersionCatalog, cron: str, timezone: str
) -> dg.ScheduleDefinition:
    """The nightly schedule that verifies the published versions of `catalog` that are active or current, and
    repairs the drifted ones (a version never published is the sensor's first build, not a repair)."""

    @dg.schedule(
        job=job, cron_schedule=cron, execution_timezone=timezone, default_status=dg.DefaultScheduleStatus.RUNNING
    )
    def store_verification(
        context: dg.ScheduleEvaluationContext, faq: FaqWorkbook, store: StoreResource
    ) -> dg.SkipReason | list[dg.RunRequest]:
        """Verifies the published active and current versions against the FAQ; re-materializes, repairing, the drifted ones."""
        try:
            templates = faq.read()
        except FaqError as exc:
            return dg.SkipReason(f"cannot verify the store: {exc}")
        with store.open() as opened:
            # The published versions runs keep fresh, and the one searches answer from.
            published = {stored.key: stored.is_current for stored in opened.versions()}
            checked = [v for v in catalog.versions if v.key in published and (v.active or published[v.key])]
            # A rollback differs from the FAQ on purpose: it stands until the version's next publish.
            rolled_back = {v.key: g for v in checked if (g := opened.rolled_back(v.key)) is not None}
            reports = [
                verify_published(opened, version, templates)
                for version in checked
                if version.key not in rolled_back
            ]
        drifted = [report for report in reports if not report.healthy]
        left = [f"{key}: generation {g} is a rollback, left as it is until the next publish"
                for key, g in rolled_back.items()]
        for note in left:
            context.log.info(note)
        if not reports and not left:
            return dg.SkipReason("nothing to verify: no active or current model version is published yet")
        if not drifted:
            return dg.SkipReason("store verified: " + "; ".join([*(r.summary() for r in reports), *left]))
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

    return store_verification
