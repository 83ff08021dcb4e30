import dagster as dg

from embedding_assets import settings
from embedding_assets.lib.model_versions import load_model_versions

model_version_partitions = dg.StaticPartitionsDefinition(
    [version.key for version in load_model_versions(settings.model_versions_path())]
)
