"""Defaults and environment variables shared by the CLI and the Dagster definitions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from embedding_assets.store import DEFAULT_STORE_URL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FAQ_PATH_VAR = "EMBEDDING_ASSETS_FAQ_PATH"
STORE_VAR = "EMBEDDING_ASSETS_STORE"
MODEL_VERSIONS_VAR = "EMBEDDING_ASSETS_MODEL_VERSIONS"
VALIDATION_QUERIES_VAR = "EMBEDDING_ASSETS_VALIDATION_QUERIES"
SENSOR_INTERVAL_VAR = "EMBEDDING_ASSETS_SENSOR_INTERVAL"
VERIFY_CRON_VAR = "EMBEDDING_ASSETS_VERIFY_CRON"
VERIFY_TIMEZONE_VAR = "EMBEDDING_ASSETS_VERIFY_TIMEZONE"
DEFAULT_FAQ_PATH = "data/faq.xlsx"
DEFAULT_SENSOR_INTERVAL = 30
DEFAULT_VERIFY_CRON = "0 3 * * *"
DEFAULT_VERIFY_TIMEZONE = "UTC"


def faq_path() -> str:
    return os.environ.get(FAQ_PATH_VAR, DEFAULT_FAQ_PATH)


def store_url() -> str:
    return os.environ.get(STORE_VAR, DEFAULT_STORE_URL)


def model_versions_path() -> str:
    return os.environ.get(MODEL_VERSIONS_VAR, str(PROJECT_ROOT / "model_versions.toml"))


def validation_queries_path() -> str:
    return os.environ.get(VALIDATION_QUERIES_VAR, str(PROJECT_ROOT / "data" / "validation_queries.json"))


def sensor_interval_seconds() -> int:
    """Seconds between two looks at the FAQ file."""
    return int(os.environ.get(SENSOR_INTERVAL_VAR, DEFAULT_SENSOR_INTERVAL))


def verify_cron() -> str:
    """Cron expression of the nightly store verification."""
    return os.environ.get(VERIFY_CRON_VAR, DEFAULT_VERIFY_CRON)


def verify_timezone() -> str:
    return os.environ.get(VERIFY_TIMEZONE_VAR, DEFAULT_VERIFY_TIMEZONE)


@dataclass(frozen=True)
class Settings:
    """Everything the Dagster definitions take from the environment, read once by their entry point."""

    faq_path: str
    store_url: str
    store_url_from_environment: bool
    model_versions_path: str
    validation_queries_path: str
    sensor_interval_seconds: int
    verify_cron: str
    verify_timezone: str

    @classmethod
    def from_environment(cls) -> Settings:
        return cls(
            faq_path=faq_path(),
            store_url=store_url(),
            store_url_from_environment=STORE_VAR in os.environ,
            model_versions_path=model_versions_path(),
            validation_queries_path=validation_queries_path(),
            sensor_interval_seconds=sensor_interval_seconds(),
            verify_cron=verify_cron(),
            verify_timezone=verify_timezone(),
        )


def dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to .dagster_home in the working directory (created if missing)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    if not instance_config.exists():
        instance_config.write_text("# Dagster instance of embedding_assets: runs, events and schedules live here.\ntelemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home
