import dagster as dg

from embedding_assets.defs.assets import GROUP

EMBED_FAQ_JOB = "embed_faq"

embed_faq_job = dg.define_asset_job(
    name=EMBED_FAQ_JOB,
    selection=dg.AssetSelection.groups(GROUP),
    description="Parse the FAQ, embed what changed for one model version, publish the store.",
    executor_def=dg.in_process_executor,  # a strictly sequential chain: one process, the model loaded once
)
