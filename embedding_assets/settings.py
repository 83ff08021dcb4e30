"""Defaults and environment variables shared by the CLI and the Dagster definitions."""

from __future__ import annotations

import os
from pathlib import Path

from embedding_assets.store import DEFAULT_STORE_URL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FAQ_PATH_VAR = "EMBEDDING_ASSETS_FAQ_PATH"
STORE_VAR = "EMBEDDING_ASSETS_STORE"
MODEL_VERSIONS_VAR = "EMBEDDING_ASSETS_MODEL_VERSIONS"
DEFAULT_FAQ_PATH = "data/faq.xlsx"


def faq_path() -> str:
    return os.environ.get(FAQ_PATH_VAR, DEFAULT_FAQ_PATH)


def store_url() -> str:
    return os.environ.get(STORE_VAR, DEFAULT_STORE_URL)


def model_versions_path() -> str:
    return os.environ.get(MODEL_VERSIONS_VAR, str(PROJECT_ROOT / "model_versions.toml"))


def dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to .dagster_home in the working directory (created if missing)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    if not instance_config.exists():
        instance_config.write_text("# Dagster instance of embedding_assets: runs, events and schedules live here.\ntelemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home
