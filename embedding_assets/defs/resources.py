import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from embedding_assets import settings
from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.lib.faq import FaqColumns, FaqSheet, Template, read_faq
from embedding_assets.lib.model_versions import ModelVersion, load_model_versions
from embedding_assets.lib.openai_embedder import DEFAULT_API_KEY_ENV, OpenAISettings
from embedding_assets.store import (
    EmbeddingStore,
    PublishRequest,
    StoreCorruptError,
    StoreSnapshot,
    open_store,
    open_store_for_rebuild,
    redact_url,
    store_backend,
)

_DEFAULT_COLUMNS = FaqColumns()


class FaqWorkbook(dg.ConfigurableResource):
    """The FAQ sheet: a workbook (.xlsx, .xlsm, .xls, .xlsb, .ods) or a UTF-8 .csv file."""

    path: str = Field(description="Path of the FAQ file (relative paths start at the working directory).")
    sheet: str | None = Field(
        default=None, description="Sheet name; default: the active sheet when visible, else the first visible one."
    )
    header_row: int | None = Field(
        default=None, description="Row number of the headers; default: the first of rows 1-20 holding every required header."
    )
    category_column: str = Field(default=_DEFAULT_COLUMNS.category, description="Header of the category column.")
    subcategory_column: str = Field(
        default=_DEFAULT_COLUMNS.subcategory, description="Header of the subcategory column."
    )
    question_column: str = Field(default=_DEFAULT_COLUMNS.question, description="Header of the example question.")
    answer_column: str = Field(default=_DEFAULT_COLUMNS.answer, description="Header of the template answer.")
    priority_column: str = Field(default=_DEFAULT_COLUMNS.priority, description="Header of the priority column.")
    audience_column: str = Field(default=_DEFAULT_COLUMNS.audience, description="Header of the audience column.")
    id_column: str = Field(
        default=_DEFAULT_COLUMNS.template_id,
        description="Header of an optional id column; without it ids derive from category, subcategory, question.",
    )
    max_removed_share: float = Field(
        default=0.5,
        description="The FAQ check refuses a sheet that drops more than this share of the published templates.",
    )

    def read(self) -> list[Template]:
        return self.read_sheet().templates

    def read_sheet(self) -> FaqSheet:
        """The templates with the sheet and header row they came from; logs which sheet was read."""
        columns = FaqColumns(
            category=self.category_column,
            subcategory=self.subcategory_column,
            question=self.question_column,
            priority=self.priority_column,
            audience=self.audience_column,
            answer=self.answer_column,
            template_id=self.id_column,
        )
        sheet = read_faq(self.path, columns, self.sheet, self.header_row)
        log = dg.get_dagster_logger()
        if sheet.other_sheets and self.sheet is None:
            log.warning(f"FAQ {self.path}: {sheet.note}")
        else:
            log.info(f"FAQ {self.path}: {sheet.note}")
        return sheet


class ModelCatalog(dg.ConfigurableResource):
    """The model versions declared in model_versions.toml, and the key of their embeddings API."""

    config_path: str = Field(description="Path of the TOML file that declares the model versions.")
    openai_api_key: str | None = Field(
        default=None,
        repr=False,
        description=f"API key for provider-openai versions whose api_key_env is {DEFAULT_API_KEY_ENV} "
        f"(the default); give it as dg.EnvVar('{DEFAULT_API_KEY_ENV}'). Versions naming another variable "
        "read that one through dg.EnvVar.",
    )

    def versions(self) -> list[ModelVersion]:
        return load_model_versions(self.config_path)

    def get(self, key: str) -> ModelVersion:
        for version in self.versions():
            if version.key == key:
                return version
        raise KeyError(f"model version {key!r} is not declared in {self.config_path}")

    def embedder(self, version: ModelVersion) -> Embedder:
        if version.provider != "openai":
            return embedder_for(version)
        variable = OpenAISettings.parse(version.settings).api_key_env
        api_key = self.openai_api_key if variable == DEFAULT_API_KEY_ENV else dg.EnvVar(variable).get_value()
        return embedder_for(version, api_key=api_key or "")


class StoreResource(dg.ConfigurableResource):
    """The embedding store the pipeline reads its state and cache from."""

    url: str = Field(
        description="Store URL: sqlite:///path.db, a file path, or postgresql://user:password@host:port/database "
        "(pass it as EnvVar('EMBEDDING_ASSETS_STORE') so the password stays out of the run config)."
    )

    @contextmanager
    def open(self) -> Iterator[EmbeddingStore]:
        store = open_store(self.url)
        try:
            yield store
        finally:
            store.close()

    @contextmanager
    def open_checked(self, *, rebuild_damaged: bool, log) -> Iterator[EmbeddingStore]:
        """The store after an integrity check; with rebuild_damaged a damaged file is moved aside first."""
        if rebuild_damaged:
            store, moved = open_store_for_rebuild(self.url)
            if moved is not None:
                log.warning(f"the store was damaged: moved it to {moved} and started a new one")
        else:
            store = _open_intact(self.url)
        try:
            yield store
        finally:
            store.close()


def _open_intact(url: str) -> EmbeddingStore:
    try:
        store = open_store(url)
    except StoreCorruptError as exc:
        raise StoreCorruptError(f"{exc}; {_REBUILD_HINT}") from exc
    try:
        store.check_integrity()
    except StoreCorruptError as exc:
        store.close()
        raise StoreCorruptError(f"{exc}; {_REBUILD_HINT}") from exc
    return store


_REBUILD_HINT = "rebuild it with `embedding-assets materialize --force` (the damaged file is kept beside it)"


class ValidationQueries(dg.ConfigurableResource):
    """Labelled customer queries that measure retrieval quality."""

    path: str = Field(description="JSON file with a `validation_queries` list (query, correct_template_id).")
    top_k: int = Field(default=3, description="A query counts as answered when its template is in the top k.")
    min_accuracy: float = Field(default=0.7, description="Top-k accuracy below this is reported as a warning.")


class EmbeddingStoreIOManager(dg.ConfigurableIOManager):
    """Publishes a model version's change set in one transaction; loads published snapshots."""

    url: str = Field(
        description="Store URL: sqlite:///path.db, a file path, or postgresql://user:password@host:port/database "
        "(pass it as EnvVar('EMBEDDING_ASSETS_STORE') so the password stays out of the run config)."
    )

    def handle_output(self, context: dg.OutputContext, obj: PublishRequest) -> None:
        store = open_store(self.url)
        try:
            result = store.publish(obj.version, obj.plan, obj.vectors)
        finally:
            store.close()
        context.add_output_metadata(
            {
                "rows": dg.MetadataValue.int(result.rows),
                "generation": dg.MetadataValue.int(result.generation),
                "published": dg.MetadataValue.bool(result.changed),
                "current_version": dg.MetadataValue.bool(result.is_current),
                "publish_ms": dg.MetadataValue.float(round(result.seconds * 1000, 2)),
                "store": dg.MetadataValue.text(redact_url(self.url)),
                "backend": dg.MetadataValue.text(store_backend(self.url)),
            }
        )

    def load_input(self, context: dg.InputContext) -> StoreSnapshot:
        store = open_store(self.url, create=False)
        try:
            return store.snapshot(context.asset_partition_key if context.has_asset_partitions else None)
        finally:
            store.close()


def store_url_config() -> str | dg.EnvVar:
    """The store URL as an EnvVar when set, so a password in it never shows in config."""
    return dg.EnvVar(settings.STORE_VAR) if settings.STORE_VAR in os.environ else settings.store_url()


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "faq": FaqWorkbook(**settings.faq_workbook_settings()),
            "models": ModelCatalog(
                config_path=settings.model_versions_path(),
                openai_api_key=dg.EnvVar(DEFAULT_API_KEY_ENV) if DEFAULT_API_KEY_ENV in os.environ else None,
            ),
            "store": StoreResource(url=store_url_config()),
            "store_io_manager": EmbeddingStoreIOManager(url=store_url_config()),
            "validation_queries": ValidationQueries(path=settings.validation_queries_path()),
        }
    )
