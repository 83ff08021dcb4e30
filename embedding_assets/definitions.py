import dagster as dg

from embedding_assets.defs.assets import build_assets
from embedding_assets.defs.budget import build_budget_check
from embedding_assets.defs.checks import build_store_checks, faq_content
from embedding_assets.defs.jobs import build_embed_faq_job
from embedding_assets.defs.partitions import model_version_partitions
from embedding_assets.defs.resources import build_resources
from embedding_assets.defs.rollback import rollback_model_version_job
from embedding_assets.defs.schedules import build_store_verification
from embedding_assets.defs.sensors import build_faq_sensor
from embedding_assets.defs.versions import promote_model_version_job
from embedding_assets.lib.model_versions import ModelVersionCatalog
from embedding_assets.settings import Settings
from embedding_assets.store import store_backend


def build_definitions(config: Settings) -> dg.Definitions:
    """Every definition of the code location, from settings and model versions each read once."""
    catalog = ModelVersionCatalog.load(config.model_versions_path)
    partitions = model_version_partitions(catalog)
    job = build_embed_faq_job(catalog)
    return dg.Definitions(
        assets=build_assets(partitions, store_backend(config.store_url)),
        asset_checks=[faq_content, build_budget_check(partitions), *build_store_checks()],
        jobs=[job, promote_model_version_job, rollback_model_version_job],
        sensors=[build_faq_sensor(job, catalog, config.sensor_interval_seconds)],
        schedules=[build_store_verification(job, catalog, config.verify_cron, config.verify_timezone)],
        resources=build_resources(config),
        executor=dg.in_process_executor,  # runs the UI, the sensor or the schedule launch stay in one process
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_environment())
