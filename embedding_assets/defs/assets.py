import time
from contextlib import ExitStack

import dagster as dg
import numpy as np
from pydantic import Field

from embedding_assets.defs.budget import estimate_metadata
from embedding_assets.defs.io_managers import (
    MISSING,
    forget_inputs_key,
    inputs_key_of,
    recall,
    unhealthy_published_ids,
    writer_lock,
)
from embedding_assets.defs.jobs import GROUP
from embedding_assets.defs.resources import FaqWorkbook, ModelCatalog, StoreResource
from embedding_assets.lib import progress
from embedding_assets.lib.embedders import embed_with_cache
from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import HashedTemplate, hash_version_templates, remember_hashed
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, build_change_plan, estimate_plan
from embedding_assets.lib.verification import mark_for_repair
from embedding_assets.lib.version_table import VersionTable, template_vectors
from embedding_assets.store import ModelVersionMismatchError, StoreError, VersionInfo
from embedding_assets.store.base import mismatch_message

LISTED_IDS = 20
STORE_KINDS = {"postgresql": {"postgres", "pgvector"}, "sqlite": {"sqlite"}}


class ChangePlanConfig(dg.Config):
    force: bool = Field(
        default=False, description="Rebuild this version from scratch: re-embed every template, bypassing the cache."
    )
    repair: bool = Field(
        default=False,
        description="Also republish templates whose stored vector is NaN, infinite, zero or of the wrong "
        "dimension (from the cache when it holds them).",
    )


def _preview(templates: list[Template], rows: int = 5) -> str:
    lines = ["| id | category | subcategory | question |", "|---|---|---|---|"]
    for t in templates[:rows]:
        lines.append(f"| {t.template_id} | {t.category} | {t.subcategory} | {t.question} |")
    return "\n".join(lines)


class _NoTexts:
    """Stands in for the embedder when nothing is to be embedded, so no client or model is built."""

    def embed_passages(self, texts):
        raise AssertionError("nothing was to be embedded")

    def embed_query(self, text):
        raise AssertionError("nothing was to be embedded")


NO_TEXTS = _NoTexts()


def list_type(name: str, item: type, description: str) -> dg.DagsterType:
    """A list checked by its container and first item: Dagster's own `list[...]` check visits every item."""
    return dg.DagsterType(
        name=name,
        description=description,
        typing_type=list[item],
        type_check_fn=lambda _, value: isinstance(value, list) and (not value or isinstance(value[0], item)),
    )


FAQ_TEMPLATES = list_type("FaqTemplates", Template, "The FAQ's templates in sheet order.")
TEMPLATE_HASHES = list_type(
    "TemplateHashes", HashedTemplate, "Each template with the text it is embedded as and that text's hash."
)
CACHED_HASHES = list_type("CachedHashes", str, "Content hashes whose vectors are in the store's cache.")


def _ms(seconds: float) -> dg.MetadataValue:
    return dg.MetadataValue.float(round(seconds * 1000, 2))


@dg.asset(group_name=GROUP, kinds={"excel", "csv"}, dagster_type=FAQ_TEMPLATES)
def faq_templates(context: dg.AssetExecutionContext, faq: FaqWorkbook) -> dg.Output[list[Template]]:
    """FAQ templates parsed and normalised from the Excel workbook."""
    started = time.perf_counter()
    key = faq.inputs_key()
    templates = recall(context, key and f"faq_templates\n{key}")
    reused = templates is not MISSING
    if reused:
        context.log.info(f"FAQ {faq.path}: unchanged since it was last parsed; its {len(templates)} template(s) reused")
    else:
        templates = faq.read()
        if faq.inputs_key() != key:  # saved again while it was read: what was parsed is not known to match
            forget_inputs_key(context)
    return dg.Output(
        templates,
        metadata={
            "templates": dg.MetadataValue.int(len(templates)),
            "categories": dg.MetadataValue.int(len({t.category for t in templates})),
            "subcategories": dg.MetadataValue.int(len({(t.category, t.subcategory) for t in templates})),
            "faq_path": dg.MetadataValue.path(faq.path),
            "parse_ms": _ms(time.perf_counter() - started),
            "reused_parse": dg.MetadataValue.bool(reused),
            "preview": dg.MetadataValue.md(_preview(templates)),
        },
    )


def _recalled_plan(
    context: dg.AssetExecutionContext, config: ChangePlanConfig, template_hashes: list[HashedTemplate],
    version: ModelVersion, store: StoreResource,
) -> tuple[ChangePlan | object, VersionInfo | None]:
    """The plan an earlier run made from the same hashed templates against the same published slice of the
    same, unwritten store (so also found intact then), and the version's record; MISSING when there is none."""
    hashes_key = inputs_key_of(template_hashes)
    if hashes_key is None or config.force or config.repair:
        return recall(context, None), None
    try:
        with store.open() as opened:
            state, stored, marker = opened.state(), opened.version(version.key), opened.change_marker()
    except StoreError:  # the checked open that follows says what is wrong
        return recall(context, None), None
    if marker is None:  # a store that cannot say whether it was written since is read again
        return recall(context, None), stored
    published = None if stored is None else (stored.generation, stored.fingerprint, stored.rows, stored.ranking)
    key = f"change_plan\n{hashes_key}\n{state.store_id}\n{marker}\n{version.fingerprint()}\n{published!r}"
    return recall(context, key), stored


def build_assets(partitions_def: dg.PartitionsDefinition, store_backend: str) -> list[dg.AssetsDefinition]:
    """The chain: the FAQ, then one partition per model version down to the store of `store_backend`."""

    @dg.asset(
        group_name=GROUP, kinds={"python"}, partitions_def=partitions_def, dagster_type=TEMPLATE_HASHES,
        ins={"faq_templates": dg.AssetIn(dagster_type=FAQ_TEMPLATES)},
    )
    def template_hashes(
        context: dg.AssetExecutionContext, faq_templates: list[Template], models: ModelCatalog
    ) -> dg.Output[list[HashedTemplate]]:
        """SHA-256 of the exact text each template is embedded as, per model version (partition)."""
        version = models.get(context.partition_key)
        faq_key = inputs_key_of(faq_templates)
        views = [(v.name, v.text_template) for v in version.views]
        hashed = recall(context, faq_key and f"template_hashes\n{faq_key}\n{version.text_template!r}\n{views!r}")
        reused = hashed is not MISSING
        if reused:
            remember_hashed(faq_templates, version, hashed)
        else:
            hashed = hash_version_templates(faq_templates, version)
        unique = len({h.content_hash for h in hashed})
        view_texts = {text_hash for h in hashed for text_hash in h.vector_hashes()}
        return dg.Output(
            hashed,
            metadata={
                "templates": dg.MetadataValue.int(len(hashed)),
                "unique_texts": dg.MetadataValue.int(unique),
                "duplicate_texts": dg.MetadataValue.int(len(hashed) - unique),
                "text_template": dg.MetadataValue.text(version.text_template),
                "views": dg.MetadataValue.json({v.name: v.text_template for v in version.text_views}),
                "unique_view_texts": dg.MetadataValue.int(len(view_texts)),
                "reused_hashes": dg.MetadataValue.bool(reused),
            },
        )

    @dg.asset(
        group_name=GROUP, kinds={"python"}, partitions_def=partitions_def,
        ins={"template_hashes": dg.AssetIn(dagster_type=TEMPLATE_HASHES)},
    )
    def change_plan(
        context: dg.AssetExecutionContext,
        config: ChangePlanConfig,
        template_hashes: list[HashedTemplate],
        models: ModelCatalog,
        store: StoreResource,
    ) -> dg.Output[ChangePlan]:
        """Templates new, modified, deleted or unchanged against one model version's (partition's) published store."""
        version = models.get(context.partition_key)
        plan, stored = _recalled_plan(context, config, template_hashes, version, store)
        reused = plan is not MISSING
        repaired: list[str] = []
        if not reused:
            with store.open_checked(rebuild_damaged=config.force, log=context.log) as opened:
                store_id = opened.state().store_id
                stored, published = opened.published(version.key)
                repaired = unhealthy_published_ids(opened, version.key) if config.repair and stored else []
            published = mark_for_repair(published, repaired)
            if stored and stored.fingerprint != version.fingerprint() and not config.force:
                raise ModelVersionMismatchError(mismatch_message(version, stored))
            plan = build_change_plan(
                template_hashes,
                published,
                model_version=version.key,
                base_generation=stored.generation if stored else None,
                rebuild=config.force,
                base_store_id=store_id,
            )
        with store.open() as opened:
            estimate = estimate_plan(plan, version, opened.cache(version), stored.rows if stored else 0)
        metadata = {name: dg.MetadataValue.int(count) for name, count in plan.counts().items()}
        metadata.update(estimate_metadata(estimate))
        metadata.update(
            {
                "to_embed": dg.MetadataValue.int(len(plan.texts_to_embed())),
                "rebuild": dg.MetadataValue.bool(plan.rebuild),
                "repaired": dg.MetadataValue.int(len(repaired)),
                "base_generation": dg.MetadataValue.int(plan.base_generation or 0),
                "reused_plan": dg.MetadataValue.bool(reused),
                "new_ids": dg.MetadataValue.json([i.template_id for i in plan.new[:LISTED_IDS]]),
                "modified_ids": dg.MetadataValue.json([i.template_id for i in plan.modified[:LISTED_IDS]]),
                "deleted_ids": dg.MetadataValue.json(plan.deleted[:LISTED_IDS]),
            }
        )
        return dg.Output(plan, metadata=metadata)

    @dg.asset(group_name=GROUP, kinds={"numpy"}, partitions_def=partitions_def, dagster_type=CACHED_HASHES)
    def template_embeddings(
        context: dg.AssetExecutionContext, change_plan: ChangePlan, models: ModelCatalog, store: StoreResource
    ) -> dg.Output[list[str]]:
        """Content hashes of one model version's new and modified texts, their vectors in the store's cache."""
        version = models.get(context.partition_key)
        texts = change_plan.texts_to_embed()
        with store.open() as opened, ExitStack() as held:
            if texts:  # one run at a time pays for a version's texts; the next one finds them cached
                held.enter_context(writer_lock(opened, version.key, store.writer_lock_timeout, context.log))
            run = embed_with_cache(
                texts,
                version=version,
                embedder=models.embedder(version) if texts else NO_TEXTS,
                cache=opened.cache(version),
                use_cache=not change_plan.rebuild,
                on_batch=progress.logged(context.log),
            )
        cost = run.cost
        context.log.info(
            f"{version.key}: {run.requested} text(s) needed, {run.cache_hits} from cache, "
            f"{run.embedded} embedded in {run.calls} call(s); {cost.requests} request(s), {cost.inputs} input(s), "
            f"{'n/a' if cost.tokens is None else cost.tokens} token(s), {cost.retries} retries"
        )
        usage = {"tokens": dg.MetadataValue.int(cost.tokens)} if cost.tokens is not None else {}
        return dg.Output(
            sorted(run.vectors),
            metadata={
                "model_version": dg.MetadataValue.text(version.key),
                "model": dg.MetadataValue.text(f"{version.provider}:{version.model}"),
                "dimension": dg.MetadataValue.int(version.dimension),
                "texts_needed": dg.MetadataValue.int(run.requested),
                "cache_hits": dg.MetadataValue.int(run.cache_hits),
                "embedded": dg.MetadataValue.int(run.embedded),
                "embedding_calls": dg.MetadataValue.int(run.calls),
                "requests": dg.MetadataValue.int(cost.requests),
                "inputs": dg.MetadataValue.int(cost.inputs),
                **usage,
                "retries": dg.MetadataValue.int(cost.retries),
                "embed_ms": _ms(run.seconds),
            },
        )

    @dg.asset(
        group_name=GROUP,
        kinds=STORE_KINDS[store_backend],
        partitions_def=partitions_def,
        io_manager_key="store_io_manager",
        ins={"template_embeddings": dg.AssetIn(dagster_type=CACHED_HASHES)},
    )
    def embedding_store(
        context: dg.AssetExecutionContext, change_plan: ChangePlan, template_embeddings: list[str],
        models: ModelCatalog, store: StoreResource,
    ) -> VersionTable:
        """One model version's (partition's) published templates and vectors; only what changed is written."""
        version = models.get(context.partition_key)
        current = sorted((*change_plan.new, *change_plan.modified, *change_plan.unchanged), key=lambda i: i.template_id)
        cached: dict[str, np.ndarray] = {}
        if template_embeddings:  # a hash the cache lost leaves its template without a vector: the publish refuses it
            with store.open() as opened:
                cached = opened.cache(version).get(template_embeddings)
        changed = (*change_plan.new, *change_plan.modified)
        return VersionTable(
            version=version,
            templates=tuple(current),
            vectors={
                i.template_id: template_vectors(i, cached)
                for i in changed
                if all(h in cached for h in i.vector_hashes())
            },
            base_generation=change_plan.base_generation,
            rebuild=change_plan.rebuild,
            plan=change_plan,
        )

    return [faq_templates, template_hashes, change_plan, template_embeddings, embedding_store]
