"""Secrets out of any text a user, a log or the Dagster UI may show: redact first, then shorten."""

from __future__ import annotations

import re
from collections.abc import Iterable

HIDDEN = "***"
# Shorter strings are too likely to occur in ordinary text to be replaced wherever they appear.
MIN_SECRET_CHARS = 4

_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"',;]+")
_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-.]{4,}")
# scheme://user:password@ — greedy up to the last "@" of the word: a password may hold "#", "?" or "/".
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/@:\"']*):[^\s\"']*@")
_PASSWORD_PARAMETER = re.compile(
    r"(?i)\b(password|passwd|pwd|api[_-]?key|secret|(?:access[_-]?)?token)(\s*[=:]\s*)"
    r"('(?:[^'\\]|\\.)*'|[^\s&\"',;]+)")


def redact(text: str, secrets: Iterable[str | None] = (), limit: int | None = None) -> str:
    """The text with known secrets, `Bearer …`/`sk-…` tokens, URL passwords and `password=` values hidden.

    Redaction runs on the whole text; only then is it cut to `limit` characters (with "…"), so a
    secret that straddles the cut cannot survive in part.
    """
    known = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, HIDDEN)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{m.group(2)}:{HIDDEN}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{HIDDEN}", text)
    text = _SK_TOKEN.sub(HIDDEN, text)
    text = _PASSWORD_PARAMETER.sub(lambda m: f"{m.group(1)}{m.group(2)}{HIDDEN}", text)
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return text
