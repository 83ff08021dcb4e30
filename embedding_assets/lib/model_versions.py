"""Model versions declared in `model_versions.toml`: one Dagster partition each."""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from dataclasses import dataclass, field
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
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def embedded_fields(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.text_template) if name is not None}


def _parse_version(raw: dict[str, Any], source: str) -> ModelVersion:
    known = {"key", "provider", "model", "dimension", "text_template", "active", "batch_size", "settings"}
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
    version = ModelVersion(
        key=key,
        provider=raw["provider"],
        model=str(raw["model"]),
        dimension=dimension,
        text_template=raw.get("text_template", DEFAULT_TEXT_TEMPLATE),
        active=bool(raw.get("active", True)),
        batch_size=batch_size,
        settings=dict(raw.get("settings", {})),
    )
    if version.provider == "openai":
        try:
            OpenAISettings.parse(version.settings)
        except ValueError as exc:
            raise ModelVersionError(f"{where}: {exc}") from exc
    try:
        fields = version.embedded_fields()
    except ValueError as exc:
        raise ModelVersionError(f"{where}: text_template is not a valid format string ({exc})") from exc
    bad = sorted(fields - set(TEMPLATE_FIELDS))
    if bad or "question" not in fields:
        raise ModelVersionError(
            f"{where}: text_template may use {', '.join(TEMPLATE_FIELDS)} and must use question "
            f"(got {', '.join(sorted(fields)) or 'no fields'})"
        )
    return version


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
