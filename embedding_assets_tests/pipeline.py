"""Run the real asset chain in process, counting what reaches the embedding model."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np

from embedding_assets.cli import run_failure_message as failure_message  # noqa: F401  (re-exported)
from embedding_assets.defs.assets import build_assets
from embedding_assets.defs.checks import build_store_checks, faq_content
from embedding_assets.defs.partitions import model_version_partitions
from embedding_assets.defs.resources import (
    EmbeddingStoreIOManager,
    FaqWorkbook,
    IntermediateIOManager,
    ModelCatalog,
    StoreResource,
    ValidationQueries,
)
from embedding_assets.lib.embedders import Embedder
from embedding_assets.lib.model_versions import ModelVersionCatalog
from embedding_assets.settings import PROJECT_ROOT, validation_queries_path

KEY = "e5-small-v1"  # a single-view version: the pipeline tests count one text per template
DEFAULT_KEY = "e5-small-views-v1"  # what model_versions.toml materializes by default
MODEL_VERSIONS = str(PROJECT_ROOT / "model_versions.toml")


def chain(model_versions: Path | str = MODEL_VERSIONS, backend: str = "sqlite") -> list[dg.AssetsDefinition]:
    """The asset chain partitioned by the versions a TOML file declares."""
    return build_assets(model_version_partitions(ModelVersionCatalog.load(model_versions)), backend)


def store_checks() -> list[dg.AssetChecksDefinition]:
    """Every asset check of the code location."""
    return [faq_content, *build_store_checks()]


ASSETS = chain()

# Every batch the model receives during a run, in order (resources are rebuilt per run,
# so the record lives at module level).
EMBEDDING_CALLS: list[list[str]] = []


class CountingEmbedder:
    """Passes every call to the real model and records the texts it was sent."""

    def __init__(self, inner: Embedder):
        self.inner = inner
        self.dimension = inner.dimension

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        EMBEDDING_CALLS.append(list(texts))
        return self.inner.embed_passages(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.inner.embed_query(text)


class CountingModelCatalog(ModelCatalog):
    def embedder(self, version):
        return CountingEmbedder(super().embedder(version))


@dataclass
class Outcome:
    result: dg.ExecuteInProcessResult
    calls: list[list[str]]
    metadata: dict[str, dict] = field(default_factory=dict)
    checks: dict[str, dg.AssetCheckEvaluation] = field(default_factory=dict)

    @property
    def steps_run(self) -> set[str]:
        return {event.step_key for event in self.result.all_events if event.event_type_value == "STEP_START"}

    @property
    def embedded_texts(self) -> list[str]:
        return [text for call in self.calls for text in call]

    @property
    def plan(self) -> dict:
        return {k: self.metadata["change_plan"][k] for k in ("new", "modified", "deleted", "unchanged", "metadata_updated")}

    @property
    def store(self) -> dict:
        return self.metadata["embedding_store"]


def run_pipeline(
    faq: Path,
    store: str | Path,
    *,
    instance: dg.DagsterInstance | None = None,
    force: bool = False,
    repair: bool = False,
    key: str = KEY,
    checks: Sequence[dg.AssetChecksDefinition] = (),
    model_versions: Path | str = MODEL_VERSIONS,
    sheet: str | None = None,
    workbook: FaqWorkbook | None = None,
    only_checks: Collection[str] | None = None,
) -> Outcome:
    """One run of the chain and `checks`; `only_checks` names the checks of `checks` that run (default: all)."""
    EMBEDDING_CALLS.clear()
    selection = None
    if only_checks is not None:
        named = [key for definition in checks for key in definition.check_keys if key.name in only_checks]
        selection = dg.AssetSelection.all().without_checks() | dg.AssetSelection.checks(*named)
    result = dg.materialize(
        [*chain(model_versions), *checks],
        selection=selection,
        partition_key=key,
        instance=instance or dg.DagsterInstance.ephemeral(),
        resources={
            "faq": workbook or FaqWorkbook(path=str(faq), sheet=sheet),
            "models": CountingModelCatalog(config_path=str(model_versions)),
            "store": StoreResource(url=str(store)),
            "store_io_manager": EmbeddingStoreIOManager(url=str(store)),
            "io_manager": IntermediateIOManager(),
            "validation_queries": ValidationQueries(path=validation_queries_path()),
        },
        run_config={"ops": {"change_plan": {"config": {"force": force, "repair": repair}}}},
        raise_on_error=False,
    )
    outcome = Outcome(result=result, calls=[list(c) for c in EMBEDDING_CALLS])
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        outcome.metadata[materialization.asset_key.to_user_string()] = {
            k: v.value for k, v in materialization.metadata.items()
        }
    for evaluation in result.get_asset_check_evaluations():
        outcome.checks[evaluation.check_name] = evaluation
    return outcome
