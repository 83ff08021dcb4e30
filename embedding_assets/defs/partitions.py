import dagster as dg

from embedding_assets.lib.model_versions import ModelVersionCatalog

PARTITION_MEANING = "one partition per model version declared in model_versions.toml"


def model_version_partitions(catalog: ModelVersionCatalog) -> dg.StaticPartitionsDefinition:
    """A partition per declared model version, keyed by the version's key."""
    return dg.StaticPartitionsDefinition(catalog.keys)
