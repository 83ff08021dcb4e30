import hashlib
import os
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field, PrivateAttr

from embedding_assets.defs.io_managers import STORE_URL_DESCRIPTION, EmbeddingStoreIOManager, IntermediateIOManager
from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.lib.faq import FaqColumns, FaqSheet, Template, faq_reader_code, read_faq
from embedding_assets.lib.model_versions import ModelVersion, ModelVersionCatalog
from embedding_assets.lib.openai_settings import DEFAULT_API_KEY_ENV, OpenAISettings
from embedding_assets.lib.plan import DEFAULT_MAX_REEMBED_SHARE, BudgetLimits
from embedding_assets.settings import DEFAULT_NEAR_DUPLICATE_COSINE, NEAR_DUPLICATE_COSINE_VAR, STORE_VAR, Settings
from embedding_assets.store import EmbeddingStore, StoreCorruptError, open_store, open_store_for_rebuild

__all__ = [
    "EmbeddingBudget",
    "EmbeddingStoreIOManager",
    "FaqWorkbook",
    "IntermediateIOManager",
    "ModelCatalog",
    "StoreResource",
    "ValidationQueries",
    "build_resources",
]

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

    def inputs_key(self) -> str | None:
        """What the parsed templates depend on: the file's bytes, these settings and the reader's code;
        None when the file cannot be read."""
        try:
            data = Path(self.path).read_bytes()
        except OSError:
            return None
        settings = (self.path, self.sheet, self.header_row, self.category_column, self.subcategory_column,
                    self.question_column, self.answer_column, self.priority_column, self.audience_column,
                    self.id_column)
        return f"{hashlib.sha256(data).hexdigest()}\n{settings!r}\n{faq_reader_code()}"

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

    _catalog: ModelVersionCatalog | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._catalog = ModelVersionCatalog.load(self.config_path)

    def catalog(self) -> ModelVersionCatalog:
        """The declared versions, read once per run (or on first use outside a run)."""
        if self._catalog is None:
            self._catalog = ModelVersionCatalog.load(self.config_path)
        return self._catalog

    def versions(self) -> list[ModelVersion]:
        return list(self.catalog().versions)

    def get(self, key: str) -> ModelVersion:
        return self.catalog().get(key)

    def embedder(self, version: ModelVersion) -> Embedder:
        if version.provider != "openai":
            return embedder_for(version)
        variable = OpenAISettings.parse(version.settings).api_key_env
        api_key = self.openai_api_key if variable == DEFAULT_API_KEY_ENV else dg.EnvVar(variable).get_value()
        return embedder_for(version, api_key=api_key or "")


class StoreResource(dg.ConfigurableResource):
    """The embedding store the pipeline reads its state and cache from."""

    url: str = Field(description=STORE_URL_DESCRIPTION)
    writer_lock_timeout: float = Field(
        default=600.0,
        description="Seconds a run waits for another run writing the same model version before it gives up.",
    )
    near_duplicate_cosine: float = Field(
        default=DEFAULT_NEAR_DUPLICATE_COSINE,
        description="The near_duplicate_templates check warns about two templates whose vectors have at least "
        f"this cosine similarity (default {DEFAULT_NEAR_DUPLICATE_COSINE}; env {NEAR_DUPLICATE_COSINE_VAR}).",
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


class EmbeddingBudget(dg.ConfigurableResource):
    """How much one run may embed before the budget guard asks for approval."""

    max_reembed_share: float = Field(
        default=DEFAULT_MAX_REEMBED_SHARE,
        description="Refuse a run that would embed more than this share (0 to 1) of a published version's "
        "templates; a first build is exempt. Default: EMBEDDING_ASSETS_MAX_REEMBED_SHARE, else 0.5.",
    )
    max_reembed_tokens: int | None = Field(
        default=None,
        description="Refuse a run whose texts to embed are estimated at more than this many tokens (characters / 3), "
        "first builds included. Default: EMBEDDING_ASSETS_MAX_REEMBED_TOKENS, else no limit.",
    )
    approved: bool = Field(
        default=False,
        description="Approve this run past both limits (what `embedding-assets materialize --approve` sets).",
    )

    def limits(self) -> BudgetLimits:
        """The limits; ValueError names a value out of range."""
        return BudgetLimits(self.max_reembed_share, self.max_reembed_tokens)


def store_url_config(config: Settings) -> str | dg.EnvVar:
    """The store URL as an EnvVar when set, so a password in it never shows in config."""
    return dg.EnvVar(STORE_VAR) if config.store_url_from_environment else config.store_url


def build_resources(config: Settings) -> dict[str, dg.ConfigurableResource | dg.ConfigurableIOManager]:
    """The resources of the code location, from settings read once."""
    return {
        "faq": FaqWorkbook(**config.faq_workbook),
        "models": ModelCatalog(
            config_path=config.model_versions_path,
            openai_api_key=dg.EnvVar(DEFAULT_API_KEY_ENV) if DEFAULT_API_KEY_ENV in os.environ else None,
        ),
        "store": StoreResource(url=store_url_config(config), near_duplicate_cosine=config.near_duplicate_cosine),
        "store_io_manager": EmbeddingStoreIOManager(url=store_url_config(config)),
        "io_manager": IntermediateIOManager(),
        "validation_queries": ValidationQueries(path=config.validation_queries_path),
        "budget": EmbeddingBudget(
            max_reembed_share=config.budget.max_share, max_reembed_tokens=config.budget.max_tokens
        ),
    }
