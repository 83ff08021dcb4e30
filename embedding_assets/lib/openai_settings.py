"""The `settings` table of a provider "openai" model version, validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL_ENV = "OPENAI_BASE_URL"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class OpenAISettings:
    """The `settings` table of a provider "openai" model version."""

    base_url: str | None = None
    base_url_env: str = DEFAULT_BASE_URL_ENV
    api_key_env: str = DEFAULT_API_KEY_ENV
    dimensions: int | None = None
    passage_input_type: str | None = None
    query_input_type: str | None = None
    passage_prefix: str = ""
    query_prefix: str = ""
    timeout: float = 60.0
    concurrency: int = 4
    max_batch_tokens: int = 8192
    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> OpenAISettings:
        """Validated settings; ValueError names the first bad one."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"unknown openai setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for name, value in settings.items():
            if name in {"base_url", "passage_input_type", "query_input_type"}:
                ok = isinstance(value, str) and value != ""
            elif name in {"base_url_env", "api_key_env"}:
                ok = isinstance(value, str) and value.isidentifier()
            elif name in {"passage_prefix", "query_prefix"}:
                ok = isinstance(value, str)
            elif name in {"timeout", "backoff_initial", "backoff_max"}:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
                ok = ok and (value > 0 or name != "timeout")
            else:  # dimensions, concurrency, max_batch_tokens, max_attempts
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise ValueError(f"openai setting {name} has an invalid value {value!r}")
        return cls(**settings)
