import dagster as dg

from embedding_assets.lib.model_versions import ModelVersionCatalog

EMBED_FAQ_JOB = "embed_faq"
GROUP = "faq_embeddings"


def build_embed_faq_job(catalog: ModelVersionCatalog):
    """The job that embeds the FAQ for one model version; its partitions are the declared versions."""
    return dg.define_asset_job(
        name=EMBED_FAQ_JOB,
        selection=dg.AssetSelection.groups(GROUP),
        description=(
            "Parse the FAQ, embed what changed for one model version, publish the store. Each partition is a "
            f"model version of model_versions.toml ({', '.join(catalog.keys)}); pick the versions to build."
        ),
        executor_def=dg.in_process_executor,  # a strictly sequential chain: one process, the model loaded once
    )
