"""Store addresses, read the way SQLite and libpq read them, and shown with every password hidden.

Accepted forms:
- `sqlite:///relative.db`, `sqlite:////absolute.db`, or a plain path ending in .db, .sqlite or .sqlite3;
- a PostgreSQL URL, `postgresql://user:password@host:port/database?schema=NAME&sslmode=…`
  (also `postgres://`), whose password libpq reads up to the `@`, `#` and `?` included;
- a libpq keyword string, `host=… port=… user=… password=… dbname=… schema=NAME`.

`schema` names the PostgreSQL schema of the store tables; it is ours and never reaches libpq.
Anything else is refused, and a string holding `password=` is never taken for a file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import psycopg2
import psycopg2.extensions

from embedding_assets.lib.redaction import HIDDEN, redact
from embedding_assets.store.base import StoreError

DEFAULT_STORE_URL = "sqlite:///data/embeddings.db"
DEFAULT_SCHEMA = "embedding_store"
SQLITE_URL_PREFIX = "sqlite:///"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
POSTGRES_SCHEMES = ("postgresql", "postgres")
SCHEMA_PARAMETER = "schema"
ACCEPTED_FORMS = (
    "sqlite:///path.db, a path ending in .db/.sqlite/.sqlite3, "
    "postgresql://user:password@host:port/database, or host=... port=... user=... password=... dbname=..."
)

_KEYWORD_START = re.compile(r"\s*[A-Za-z_]+\s*=")
# Parameters whose values are shown; any other value (a misspelt "pasword" too) shows as "…".
SHOWN_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "sslmode", "connect_timeout", "application_name",
    "target_session_attrs", "gssencmode", "channel_binding", SCHEMA_PARAMETER,
})


@dataclass(frozen=True)
class PostgresAddress:
    """A PostgreSQL store address as libpq parsed it, plus the schema of the store tables."""

    dsn: str = field(repr=False)  # the address without our `schema`, in its own form (URL or keywords)
    parameters: dict[str, str] = field(repr=False)
    schema: str = DEFAULT_SCHEMA

    @property
    def password(self) -> str | None:
        return self.parameters.get("password") or None


def _scheme(text: str) -> str | None:
    head, sep, _ = text.partition("://")
    return head.lower() if sep else None


def _keyword_pairs(text: str) -> list[tuple[str, str]] | None:
    """`key=value` pairs of a libpq keyword string (quotes and backslashes as libpq reads them), or None."""
    if not _KEYWORD_START.match(text):
        return None
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i == n or text[i] != "=" or not key:
            return None
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while i < n and text[i] != "'":
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            if i == n:
                return None
            i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
        pairs.append((key, "".join(value)))


def _split_url(text: str) -> tuple[str, str, str, str | None]:
    """(scheme://, user info or "", host/database part, query or None), split where libpq splits."""
    scheme, _, rest = text.partition("://")
    stop = next((i for i, c in enumerate(rest) if c in "@/"), len(rest))
    userinfo = ""
    if stop < len(rest) and rest[stop] == "@":
        userinfo, rest = rest[:stop], rest[stop + 1 :]
    location, sep, query = rest.partition("?")
    return f"{scheme}://", userinfo, location, query if sep else None


def is_postgres(url: str | Path) -> bool:
    """Whether the address names a PostgreSQL store (a postgresql:// URL or a libpq keyword string)."""
    text = str(url)
    if _scheme(text) is not None:
        return _scheme(text) in POSTGRES_SCHEMES
    return _KEYWORD_START.match(text) is not None


def store_backend(url: str | Path) -> str:
    """The backend a store address selects: "postgresql" or "sqlite"."""
    return "postgresql" if is_postgres(url) else "sqlite"


def _libpq_problem(exc: psycopg2.Error) -> str:
    message = str(exc).strip().splitlines()[0].removeprefix("invalid dsn: ")
    # libpq quotes the word it stumbled on, which may be a password typed without its key.
    return re.sub(r'missing "=" after "[^"]*"', 'a word without "=" (keyword=value expected)', message)


def parse_postgres(url: str | Path) -> PostgresAddress:
    """The libpq parameters and the schema of a PostgreSQL store address; StoreError when libpq refuses it."""
    text = str(url).strip()
    schema: str | None = None
    if _scheme(text) in POSTGRES_SCHEMES:
        prefix, userinfo, location, query = _split_url(text)
        kept = []
        for item in (query or "").split("&") if query else []:
            name, _, value = item.partition("=")
            if unquote(name) == SCHEMA_PARAMETER:
                schema = unquote(value) if schema is None else schema
            else:
                kept.append(item)
        conninfo = prefix + (f"{userinfo}@" if userinfo else "") + location + ("?" + "&".join(kept) if kept else "")
    else:
        pairs = _keyword_pairs(text)
        if pairs is None:
            raise StoreError(
                "the store address looks like a libpq keyword string (key=value ...) but cannot be read: "
                "a quote is not closed or a word has no \"=\"; quote values with spaces as key='a value'"
            )
        schema = next((value for key, value in pairs if key == SCHEMA_PARAMETER), None)
        rest = [(key, value) for key, value in pairs if key != SCHEMA_PARAMETER]
        conninfo = " ".join(f"{key}={_quote_keyword(value)}" for key, value in rest)
    try:
        parameters = psycopg2.extensions.parse_dsn(conninfo)
    except psycopg2.Error as exc:
        raise StoreError(f"{_shown(text)} is not a valid PostgreSQL address: {_libpq_problem(exc)}") from None
    if schema is not None and not schema:
        raise StoreError("the store URL's schema parameter is empty")
    return PostgresAddress(conninfo, parameters, schema or DEFAULT_SCHEMA)


def connection_settings(url: str | Path) -> tuple[str, str]:
    """The libpq connection string and the schema a PostgreSQL store address names."""
    address = parse_postgres(url)
    return address.dsn, address.schema


def sqlite_path(url: str | Path) -> Path | None:
    """The file of an SQLite store address, or None when the address is not an accepted SQLite one."""
    text = str(url)
    if "password=" in text.lower():
        return None
    if text.startswith(SQLITE_URL_PREFIX):
        return Path(text[len(SQLITE_URL_PREFIX) :])
    if _scheme(text) is not None or _KEYWORD_START.match(text):
        return None
    return Path(text) if text.lower().endswith(SQLITE_SUFFIXES) else None


def parse_store_url(url: str | Path) -> Path | PostgresAddress:
    """The SQLite file or the PostgreSQL address a store address names; StoreError for any other string."""
    if is_postgres(url):
        return parse_postgres(url)
    path = sqlite_path(url)
    if path is None:
        text = str(url)
        scheme = _scheme(text)
        if "password=" in text.lower():
            what = "a store address holding password= is never used as a file name, and this is no PostgreSQL address:"
        elif scheme:
            what = f"unsupported store URL scheme {scheme!r} in"
        else:
            what = "unsupported store address (an SQLite path must end in .db, .sqlite or .sqlite3)"
        raise StoreError(f"{what} {redact_url(text)}; use {ACCEPTED_FORMS}")
    return path


def _quote_keyword(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hidden_value(name: str, value: str) -> str:
    if name in SHOWN_PARAMETERS or not value:
        return value
    return HIDDEN if name == "password" else "…"


def _redact_postgres_url(text: str) -> str:
    prefix, userinfo, location, query = _split_url(text)
    if userinfo:
        user, sep, password = userinfo.partition(":")
        userinfo = f"{user}:{HIDDEN}" if password else user + sep
    if query is not None:
        items = []
        for item in query.split("&"):
            name, sep, value = item.partition("=")
            shown = _hidden_value(unquote(name), value)
            items.append(item if shown == value else f"{name}={shown}")
        query = "&".join(items)
    return prefix + (f"{userinfo}@" if userinfo else "") + location + ("" if query is None else f"?{query}")


def _shown(text: str) -> str:
    """The address with the password hidden where its form puts it (no parsing by libpq)."""
    if _scheme(text) in POSTGRES_SCHEMES:
        shown = _redact_postgres_url(text)
    elif _scheme(text) is None and _KEYWORD_START.match(text):
        pairs = _keyword_pairs(text)
        if pairs is None:
            return "(an unreadable libpq keyword string)"
        shown = " ".join(
            f"{key}={_quote_keyword(value) if key in SHOWN_PARAMETERS else _hidden_value(key, value)}"
            for key, value in pairs
        )
    else:
        shown = text
    return redact(shown)


def redact_url(url: str | Path) -> str:
    """The store address with its password hidden, safe for messages, logs and metadata; never raises."""
    text = str(url)
    shown = _shown(text)
    try:
        password = parse_postgres(text).password if is_postgres(text) else None
    except StoreError:
        password = None
    return redact(shown, [password, quote(password, safe="") if password else None])
