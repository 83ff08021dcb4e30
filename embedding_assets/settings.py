"""Defaults and environment variables shared by the CLI and the Dagster definitions."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from embedding_assets.lib.plan import DEFAULT_MAX_REEMBED_SHARE, BudgetLimits
from embedding_assets.store import DEFAULT_STORE_URL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FAQ_PATH_VAR = "EMBEDDING_ASSETS_FAQ_PATH"
STORE_VAR = "EMBEDDING_ASSETS_STORE"
MODEL_VERSIONS_VAR = "EMBEDDING_ASSETS_MODEL_VERSIONS"
VALIDATION_QUERIES_VAR = "EMBEDDING_ASSETS_VALIDATION_QUERIES"
SENSOR_INTERVAL_VAR = "EMBEDDING_ASSETS_SENSOR_INTERVAL"
VERIFY_CRON_VAR = "EMBEDDING_ASSETS_VERIFY_CRON"
VERIFY_TIMEZONE_VAR = "EMBEDDING_ASSETS_VERIFY_TIMEZONE"
NEAR_DUPLICATE_COSINE_VAR = "EMBEDDING_ASSETS_NEAR_DUPLICATE_COSINE"
# Measured with e5-small: the bank FAQ's two restated answers are above it, the sample FAQ's closest pair is 0.944.
DEFAULT_NEAR_DUPLICATE_COSINE = 0.98
MAX_REEMBED_SHARE_VAR = "EMBEDDING_ASSETS_MAX_REEMBED_SHARE"
MAX_REEMBED_TOKENS_VAR = "EMBEDDING_ASSETS_MAX_REEMBED_TOKENS"
DEFAULT_FAQ_PATH = "data/faq.xlsx"
CONFIG_VAR = "EMBEDDING_ASSETS_CONFIG"
DEFAULT_CONFIG_PATH = "embedding_assets.toml"
FAQ_SHEET_VAR = "EMBEDDING_ASSETS_FAQ_SHEET"
FAQ_HEADER_ROW_VAR = "EMBEDDING_ASSETS_FAQ_HEADER_ROW"
FAQ_COLUMN_KEYS = ("category", "subcategory", "question", "answer", "priority", "audience", "id")
FAQ_COLUMN_VARS = {key: f"EMBEDDING_ASSETS_FAQ_{key.upper()}_COLUMN" for key in FAQ_COLUMN_KEYS}
DEFAULT_SENSOR_INTERVAL = 30
DEFAULT_VERIFY_CRON = "0 3 * * *"
DEFAULT_VERIFY_TIMEZONE = "UTC"
# Longest accepted search query: about the 512 tokens the query model reads, more is never read.
MAX_QUERY_CHARS = 2000
# Most templates one search returns, on the command line and over HTTP.
MAX_TOP_K = 50


def faq_path() -> str:
    return faq_workbook_settings()["path"]


def config_path() -> Path:
    """The project config file (its [faq] table names the FAQ file, sheet and columns)."""
    return Path(os.environ.get(CONFIG_VAR, DEFAULT_CONFIG_PATH))


def faq_workbook_settings() -> dict[str, object]:
    """FaqWorkbook's fields: each from its environment variable, else the [faq] table of the config file, else the default."""
    table = _faq_table(config_path())
    columns = table.get("columns", {})
    found: dict[str, object] = {}
    if "path" in table:
        found["path"] = str(config_path().parent / table["path"])
    for key in ("sheet", "header_row"):
        if key in table:
            found[key] = table[key]
    for key in FAQ_COLUMN_KEYS:
        if key in columns:
            found[f"{key}_column"] = columns[key]
    variables = {"path": FAQ_PATH_VAR, "sheet": FAQ_SHEET_VAR, "header_row": FAQ_HEADER_ROW_VAR}
    variables |= {f"{key}_column": name for key, name in FAQ_COLUMN_VARS.items()}
    for field, variable in variables.items():
        if os.environ.get(variable):
            found[field] = os.environ[variable]
    if "header_row" in found:
        found["header_row"] = _positive_int(found["header_row"], f"{FAQ_HEADER_ROW_VAR} / [faq] header_row")
    found.setdefault("path", DEFAULT_FAQ_PATH)
    return found


def _faq_table(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("faq", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(table) - {"path", "sheet", "header_row", "columns"})
    unknown += sorted(f"columns.{k}" for k in set(table.get("columns", {})) - set(FAQ_COLUMN_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) in [faq]: {', '.join(unknown)} (known: path, sheet, header_row, "
            f"columns.{{{', '.join(FAQ_COLUMN_KEYS)}}})"
        )
    return table


def _positive_int(value: object, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a row number (1 or more), not {value!r}")
    return number


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


def near_duplicate_cosine() -> float:
    """The cosine at or above which two templates' vectors count as near duplicates."""
    raw = os.environ.get(NEAR_DUPLICATE_COSINE_VAR, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_NEAR_DUPLICATE_COSINE
    except ValueError:
        value = float("nan")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{NEAR_DUPLICATE_COSINE_VAR} must be a cosine between -1 and 1, not {raw!r}")
    return value
def budget_limits() -> BudgetLimits:
    """The budget guard's limits: EMBEDDING_ASSETS_MAX_REEMBED_SHARE and _TOKENS, else the defaults."""
    share_text = os.environ.get(MAX_REEMBED_SHARE_VAR, "").strip()
    tokens_text = os.environ.get(MAX_REEMBED_TOKENS_VAR, "").strip()
    share, tokens = DEFAULT_MAX_REEMBED_SHARE, None
    if share_text:
        try:
            share = float(share_text)
        except ValueError:
            share = math.nan
        if not 0 <= share <= 1:
            raise ValueError(
                f"{MAX_REEMBED_SHARE_VAR} must be a share from 0 to 1 (0.5 is half of a version's templates), "
                f"not {share_text!r}"
            )
    if tokens_text:
        try:
            tokens = int(tokens_text)
        except ValueError:
            tokens = 0
        if tokens < 1:
            raise ValueError(
                f"{MAX_REEMBED_TOKENS_VAR} must be a whole number of tokens, 1 or more (unset: no limit), "
                f"not {tokens_text!r}"
            )
    return BudgetLimits(share, tokens)


@dataclass(frozen=True)
class Settings:
    """Everything the Dagster definitions take from the environment, read once by their entry point."""

    faq_path: str
    faq_workbook: dict[str, object]
    store_url: str
    store_url_from_environment: bool
    model_versions_path: str
    validation_queries_path: str
    sensor_interval_seconds: int
    verify_cron: str
    verify_timezone: str
    near_duplicate_cosine: float = DEFAULT_NEAR_DUPLICATE_COSINE
    budget: BudgetLimits = BudgetLimits()

    @classmethod
    def from_environment(cls) -> Settings:
        workbook = faq_workbook_settings()
        return cls(
            faq_path=str(workbook["path"]),
            faq_workbook=workbook,
            store_url=store_url(),
            store_url_from_environment=STORE_VAR in os.environ,
            model_versions_path=model_versions_path(),
            validation_queries_path=validation_queries_path(),
            sensor_interval_seconds=sensor_interval_seconds(),
            verify_cron=verify_cron(),
            verify_timezone=verify_timezone(),
            near_duplicate_cosine=near_duplicate_cosine(),
            budget=budget_limits(),
        )


INSTANCE_YAML_HEADER = """\
# Dagster instance of embedding_assets: runs, events and schedules live here, in SQLite files laid
# out as Dagster's default storage lays them out, with connections kept open between events
# (embedding_assets/instance_storage.py; `synchronous: FULL` under `config` syncs every commit).
"""
_EARLIER_INSTANCE_YAML = "# Dagster instance of embedding_assets: runs, events and schedules live here.\ntelemetry:\n  enabled: false\n"


_BASE_DIR_LINE = re.compile(r'^( +base_dir: )("(?:[^"\\]|\\.)*")[ \t]*$', re.MULTILINE)


def instance_yaml(home: Path) -> str:
    """The dagster.yaml of a DAGSTER_HOME at `home` (an absolute path: the instance opens from a path
    alone, `DagsterInstance.from_config`, without DAGSTER_HOME set)."""
    return (
        f"{INSTANCE_YAML_HEADER}storage:\n  custom:\n    module: embedding_assets.instance_storage\n"
        f"    class: PooledSqliteStorage\n    config:\n      base_dir: {json.dumps(str(home))}\n"
        "telemetry:\n  enabled: false\n"
    )


def dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to .dagster_home in the working directory (created if missing, with
    instance_yaml() as its dagster.yaml when it has none or has the one earlier releases wrote; in ours,
    edited or not, only the directory is updated after a move; any other dagster.yaml is left as it is)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    written = instance_config.read_text() if instance_config.exists() else None
    wanted = instance_yaml(home)
    if written is None or written == _EARLIER_INSTANCE_YAML:
        instance_config.write_text(wanted)
    elif written.startswith(INSTANCE_YAML_HEADER):  # ours, perhaps edited: only a moved directory is mended
        named = _BASE_DIR_LINE.search(written)
        if named is not None and json.loads(named.group(2)) != str(home):
            instance_config.write_text(
                written[: named.start()] + named.group(1) + json.dumps(str(home)) + written[named.end():]
            )
    os.environ["DAGSTER_HOME"] = str(home)
    return home
