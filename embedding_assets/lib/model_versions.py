"""Model versions declared in `model_versions.toml`: one Dagster partition each."""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embedding_assets.lib.faq import OPTIONAL_FIELDS, REQUIRED_FIELDS
from embedding_assets.lib.openai_settings import OpenAISettings

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
PROVIDERS = ("local", "openai")
# Provider "openai" settings that change how vectors are fetched, never the vectors themselves:
# they stay out of the fingerprint, so tuning them keeps the cache and the published store valid.
OPENAI_TRANSPORT_SETTINGS = frozenset(
    {"base_url", "base_url_env", "api_key_env", "timeout", "concurrency", "max_batch_tokens", "max_attempts",
     "backoff_initial", "backoff_max"}
)
TEMPLATE_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
DEFAULT_TEXT_TEMPLATE = "{subcategory}: {question}\n{answer}"
FUSIONS = ("sum", "max")
LEXICAL_KINDS = ("char_ngrams",)
SINGLE_VIEW = "text"
"""The name of the one view of a version that declares no views (its text_template)."""


@dataclass(frozen=True)
class View:
    """One text a template is embedded as, and the weight of its similarity in the fused score."""

    name: str
    text_template: str
    weight: float = 1.0

    def fields(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.text_template) if name is not None}


@dataclass(frozen=True)
class LexicalSignal:
    """A lexical score added to the dense one: `weight` times the score divided by the query's best."""

    kind: str
    weight: float


class ModelVersionError(ValueError):
    """The model-version configuration is invalid."""


@dataclass(frozen=True)
class ModelVersion:
    """An embedding model and the settings that determine its vectors."""

    key: str
    provider: str
    model: str
    dimension: int
    text_template: str = DEFAULT_TEXT_TEMPLATE
    active: bool = True
    batch_size: int = 32
    settings: dict[str, Any] = field(default_factory=dict)
    views: tuple[View, ...] = ()
    """Declared views; empty means one view, `text_template` (as before views existed)."""
    fusion: str = "sum"
    lexical: LexicalSignal | None = None

    @property
    def text_views(self) -> tuple[View, ...]:
        """The views embedded per template, in declaration order (one for a version without views)."""
        return self.views or (View(SINGLE_VIEW, self.text_template, 1.0),)

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """Shape of one template's vectors: (dimension,) for one view, (views, dimension) for several."""
        return (len(self.views), self.dimension) if self.views else (self.dimension,)

    def ranking(self) -> dict[str, Any]:
        """How a retriever ranks this version's templates (stored with it; not part of the fingerprint)."""
        if not self.views and self.lexical is None:
            return {}
        ranking: dict[str, Any] = {"fusion": self.fusion}
        if self.views:
            ranking["views"] = [[v.name, v.text_template, v.weight] for v in self.views]
        if self.lexical is not None:
            ranking["lexical"] = {"kind": self.lexical.kind, "weight": self.lexical.weight}
        return ranking

    def with_ranking(self, ranking: dict[str, Any]) -> ModelVersion:
        """This version with the views, fusion and lexical signal a stored ranking record describes."""
        if not ranking:
            return self
        lexical = ranking.get("lexical")
        return replace(
            self,
            views=tuple(View(n, t, float(w)) for n, t, w in ranking.get("views", [])),
            fusion=ranking.get("fusion", "sum"),
            lexical=LexicalSignal(lexical["kind"], float(lexical["weight"])) if lexical else None,
        )

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors (not batch size, activity or transport settings)."""
        settings = self.settings
        if self.provider == "openai":
            settings = {k: v for k, v in settings.items() if k not in OPENAI_TRANSPORT_SETTINGS}
        identity = {
            "provider": self.provider,
            "model": self.model,
            "dimension": self.dimension,
            "text_template": self.text_template,
            "settings": settings,
        }
        if self.views:  # only the view texts change vectors; weights, fusion and lexical signals rank them
            identity["views"] = [[v.name, v.text_template] for v in self.views]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def embedded_fields(self) -> set[str]:
        return set().union(*(view.fields() for view in self.text_views))


def _parse_version(raw: dict[str, Any], source: str) -> ModelVersion:
    known = {
        "key", "provider", "model", "dimension", "text_template", "active", "batch_size", "settings", "views",
        "fusion", "lexical",
    }
    unknown = sorted(set(raw) - known)
    key = raw.get("key")
    where = f"{source}: model version {key!r}"
    if unknown:
        raise ModelVersionError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    for name in ("key", "provider", "model", "dimension"):
        if name not in raw:
            raise ModelVersionError(f"{where}: missing required setting {name!r}")
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ModelVersionError(
            f"{where}: key must match {KEY_PATTERN.pattern} (lowercase letters, digits, '.', '_', '-')"
        )
    if raw["provider"] not in PROVIDERS:
        raise ModelVersionError(f"{where}: provider must be one of {', '.join(PROVIDERS)}")
    dimension = raw["dimension"]
    if not isinstance(dimension, int) or isinstance(dimension, bool) or not 1 <= dimension <= 16000:
        raise ModelVersionError(f"{where}: dimension must be an integer between 1 and 16000")
    batch_size = raw.get("batch_size", 32)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ModelVersionError(f"{where}: batch_size must be a positive integer")
    views = _parse_views(raw.get("views"), where)
    if views and "text_template" in raw:
        raise ModelVersionError(f"{where}: declare either text_template or views, not both")
    fusion = raw.get("fusion", "sum")
    if fusion not in FUSIONS:
        raise ModelVersionError(f"{where}: fusion must be one of {', '.join(FUSIONS)}")
    version = ModelVersion(
        key=key,
        provider=raw["provider"],
        model=str(raw["model"]),
        dimension=dimension,
        text_template=views[0].text_template if views else raw.get("text_template", DEFAULT_TEXT_TEMPLATE),
        active=bool(raw.get("active", True)),
        batch_size=batch_size,
        settings=dict(raw.get("settings", {})),
        views=views,
        fusion=fusion,
        lexical=_parse_lexical(raw.get("lexical"), where),
    )
    if version.provider == "openai":
        try:
            OpenAISettings.parse(version.settings)
        except ValueError as exc:
            raise ModelVersionError(f"{where}: {exc}") from exc
    for view in version.text_views:
        setting = f"views.{view.name}.text_template" if version.views else "text_template"
        try:
            fields = view.fields()
        except ValueError as exc:
            raise ModelVersionError(f"{where}: {setting} is not a valid format string ({exc})") from exc
        bad = sorted(fields - set(TEMPLATE_FIELDS))
        if bad or "question" not in fields:
            raise ModelVersionError(
                f"{where}: {setting} may use {', '.join(TEMPLATE_FIELDS)} and must use question "
                f"(got {', '.join(sorted(fields)) or 'no fields'})"
            )
    return version


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ModelVersionError(f"{where} must be a number of at least 0")
    return float(value)


def _parse_views(raw: Any, where: str) -> tuple[View, ...]:
    """`views = {name = {text_template = "...", weight = 1.0}, ...}` in declaration order."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ModelVersionError(f"{where}: views must be a table of named views")
    views = []
    for name, spec in raw.items():
        if not KEY_PATTERN.fullmatch(name):
            raise ModelVersionError(f"{where}: view name {name!r} must match {KEY_PATTERN.pattern}")
        if not isinstance(spec, dict) or not isinstance(spec.get("text_template"), str):
            raise ModelVersionError(f"{where}: view {name!r} needs a text_template")
        unknown = sorted(set(spec) - {"text_template", "weight"})
        if unknown:
            raise ModelVersionError(f"{where}: view {name!r}: unknown setting(s) {', '.join(unknown)}")
        views.append(View(name, spec["text_template"], _number(spec.get("weight", 1.0), f"{where}: view {name!r} weight")))
    return tuple(views)


def _parse_lexical(raw: Any, where: str) -> LexicalSignal | None:
    """`lexical = {kind = "char_ngrams", weight = 0.03}`."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("kind") not in LEXICAL_KINDS or set(raw) - {"kind", "weight"}:
        raise ModelVersionError(
            f"{where}: lexical must be {{kind = {' | '.join(map(repr, LEXICAL_KINDS))}, weight = NUMBER}}"
        )
    return LexicalSignal(raw["kind"], _number(raw.get("weight", 0.0), f"{where}: lexical weight"))


def load_model_versions(path: str | Path) -> list[ModelVersion]:
    """Read and validate the model versions declared in a TOML file."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelVersionError(f"model versions file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelVersionError(f"{path}: invalid TOML ({exc})") from exc
    versions = [_parse_version(raw, str(path)) for raw in document.get("model_version", [])]
    if not versions:
        raise ModelVersionError(f"{path}: declare at least one [[model_version]]")
    keys = [v.key for v in versions]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ModelVersionError(f"{path}: duplicate model version key(s) {', '.join(duplicates)}")
    return versions


@dataclass(frozen=True)
class ModelVersionCatalog:
    """The model versions of one TOML file, loaded once: the partitions, the sensor and the schedule share it."""

    source: str
    versions: tuple[ModelVersion, ...]

    @classmethod
    def load(cls, path: str | Path) -> ModelVersionCatalog:
        return cls(str(path), tuple(load_model_versions(path)))

    @property
    def keys(self) -> list[str]:
        return [v.key for v in self.versions]

    def active(self) -> list[ModelVersion]:
        return [v for v in self.versions if v.active]

    def get(self, key: str) -> ModelVersion:
        for version in self.versions:
            if version.key == key:
                return version
        raise KeyError(f"model version {key!r} is not declared in {self.source} (declared: {', '.join(self.keys)})")
