import dagster as dg

from embedding_assets.defs.assets import GROUP
from embedding_assets.defs.partitions import model_version_partitions

EMBED_FAQ_JOB = "embed_faq"

embed_faq_job = dg.define_asset_job(
    name=EMBED_FAQ_JOB,
    selection=dg.AssetSelection.groups(GROUP),
    partitions_def=model_version_partitions,
    description="Parse the FAQ, embed what changed for one model version, publish the store.",
)
