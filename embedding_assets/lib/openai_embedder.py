"""Embeddings from any OpenAI-compatible `/v1/embeddings` endpoint: batched, concurrent, retried.

The API key is passed in by the caller (the Dagster layer resolves it through `dg.EnvVar`, the
retrieval layer from the environment) and never appears in reprs, logs or error messages.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from embedding_assets.lib.batching import CHARS_PER_TOKEN, approximate_tokens, plan_batches  # noqa: F401  (re-exported)
from embedding_assets.lib.embedding_base import EmbeddingCost, EmbeddingError
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.openai_settings import (  # noqa: F401  (re-exported)
    DEFAULT_API_KEY_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_BASE_URL_ENV,
    OpenAISettings,
)
from embedding_assets.lib.redaction import redact

# The official client refuses to start without a key; servers without authentication ignore it.
NO_KEY = "no-key-configured"
RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
RETRY_AFTER_CEILING_S = 300.0
SERVER_MESSAGE_CHARS = 200  # of a provider's error message, kept after redaction


def api_key_from_environment(version: ModelVersion) -> str | None:
    """The key in the variable the version names (default OPENAI_API_KEY), or None when unset."""
    return os.environ.get(OpenAISettings.parse(version.settings).api_key_env) or None


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class _Fatal(Exception):
    def __init__(self, reason: str, status: int | None):
        super().__init__(reason)
        self.reason, self.status = reason, status


class _Stopped(Exception):
    """Another batch failed for good; this one gave up without another attempt."""


class EmbeddingApiError(EmbeddingError):
    """The embeddings API failed; what was received before the failure is already cached."""

    def __init__(self, message: str, *, status: int | None, embedded: int, failed: int):
        super().__init__(message)
        self.status, self.embedded, self.failed = status, embedded, failed


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait (retry-after-ms, Retry-After seconds or HTTP date)."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class OpenAIEmbedder:
    """A model behind an OpenAI-compatible embeddings endpoint, called with the official client."""

    def __init__(self, version: ModelVersion, api_key: str | None):
        import openai

        self.version_key = version.key
        self.model = version.model
        self.dimension = version.dimension
        self.batch_size = version.batch_size
        self.settings = OpenAISettings.parse(version.settings)
        self.base_url = self.settings.base_url or os.environ.get(self.settings.base_url_env) or DEFAULT_BASE_URL
        self._api_key = api_key or None
        self._secrets = _url_secrets(self.base_url) + ([self._api_key] if self._api_key else [])
        self.display_url = redact(self.base_url, self._secrets)
        self._key_variable = self.settings.api_key_env
        self._client = openai.OpenAI(
            api_key=self._api_key or NO_KEY,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.settings.timeout,
        )
        self._openai = openai
        self._lock = threading.Lock()
        self.cost = EmbeddingCost(tokens=None)

    def __repr__(self) -> str:
        return (f"OpenAIEmbedder(model_version={self.version_key!r}, model={self.model!r}, "
                f"base_url={self.display_url!r})")

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start, end, batch in self.embed_passage_batches(texts, max_inputs=self.batch_size):
            vectors[start:end] = batch
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        try:
            return self._embed_with_retries(
                [self.settings.query_prefix + text], self.settings.query_input_type, threading.Event()
            )[0]
        except (_Fatal, _Retryable) as failure:
            raise EmbeddingApiError(
                f"model version {self.version_key!r}: embedding the query failed: {failure.reason}",
                status=failure.status, embedded=0, failed=1,
            ) from None

    def embed_passage_batches(
        self, texts: Sequence[str], max_inputs: int
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, end, vectors) for each batch as it completes, up to `concurrency` in flight.

        Batches that succeed are yielded even after another one failed for good, so the caller can
        keep them; then EmbeddingApiError reports how many texts were embedded and how many not.
        """
        texts = [self.settings.passage_prefix + t for t in texts]
        batches = plan_batches(texts, max_inputs, self.settings.max_batch_tokens)
        stop = threading.Event()
        embedded = 0
        failure: _Fatal | _Retryable | None = None
        pool = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="embed")
        pending: dict[Future, tuple[int, int]] = {}
        queue = iter(batches)
        try:
            def submit_next() -> None:
                batch = next(queue, None)
                if batch is not None:
                    start, end = batch
                    future = pool.submit(
                        self._embed_with_retries, texts[start:end], self.settings.passage_input_type, stop
                    )
                    pending[future] = batch

            for _ in range(self.settings.concurrency):
                submit_next()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    start, end = pending.pop(future)
                    try:
                        vectors = future.result()
                    except _Stopped:
                        continue
                    except (_Fatal, _Retryable) as exc:
                        if failure is None:
                            failure = exc
                        stop.set()
                        continue
                    embedded += end - start
                    yield start, end, vectors
                    if not stop.is_set():
                        submit_next()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise EmbeddingApiError(
                f"model version {self.version_key!r}: {failure.reason}; {embedded} of {len(texts)} text(s) "
                f"embedded and cached, {len(texts) - embedded} failed (a rerun sends only those)",
                status=failure.status, embedded=embedded, failed=len(texts) - embedded,
            )

    def _embed_with_retries(self, texts: list[str], input_type: str | None, stop: threading.Event) -> np.ndarray:
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            if stop.is_set():
                raise _Stopped()
            try:
                return self._send(texts, input_type)
            except _Retryable as exc:
                if attempt == attempts:
                    status = "none" if exc.status is None else exc.status
                    raise _Retryable(
                        f"gave up after {attempts} attempt(s); last HTTP status {status} ({exc.reason})", exc.status
                    ) from None
                backoff = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempt - 1))
                delay = exc.retry_after if exc.retry_after is not None else backoff * random.uniform(0.5, 1.0)
                if stop.wait(min(delay, RETRY_AFTER_CEILING_S)):
                    raise _Stopped() from None
                with self._lock:
                    self.cost.retries += 1
        raise AssertionError("unreachable")

    def _send(self, texts: list[str], input_type: str | None) -> np.ndarray:
        """One request; raises _Retryable or _Fatal with a message free of the API key."""
        openai = self._openai
        extra_body = {"input_type": input_type} if input_type else None
        with self._lock:
            self.cost.requests += 1
            self.cost.inputs += len(texts)
        try:
            response = self._client.embeddings.with_raw_response.create(
                model=self.model,
                input=texts,
                encoding_format="float",
                **({"dimensions": self.settings.dimensions} if self.settings.dimensions else {}),
                extra_body=extra_body,
            )
        except openai.APITimeoutError:
            raise _Retryable(
                f"no reply from {self.display_url} within the {self.settings.timeout:g} s timeout", None
            ) from None
        except openai.APIConnectionError:
            raise _Retryable(f"cannot connect to {self.display_url}", None) from None
        except openai.APIStatusError as exc:
            raise self._status_failure(exc.status_code, exc.response.headers, exc.body) from None
        return self._parse(response.http_response.content, len(texts))

    def _status_failure(self, status: int, headers: Mapping[str, str], body: object) -> Exception:
        detail = redact(_server_message(body), self._secrets, limit=SERVER_MESSAGE_CHARS)
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status in RETRYABLE_STATUSES:
            return _Retryable(detail or f"HTTP {status}", status, retry_after_seconds(headers))
        if status in (401, 403):
            state = "is set" if self._api_key else "is not set"
            return _Fatal(
                f"the server at {self.display_url} refused the API key ({said}); check the environment variable "
                f"{self._key_variable} (it {state}; settings.api_key_env names it)",
                status,
            )
        if status == 404:
            hint = f"check the model name {self.model!r} and the base URL {self.display_url}"
        elif status == 413:
            hint = "lower batch_size or settings.max_batch_tokens"
        else:
            hint = f"check the model version's settings (model {self.model!r}, dimensions, input types)"
        return _Fatal(f"the server at {self.display_url} rejected the request ({said}); {hint}", status)

    def _parse(self, content: bytes, expected: int) -> np.ndarray:
        try:
            document = json.loads(content)
            data = document["data"]
            items = sorted(data, key=lambda item: item["index"])
            if [item["index"] for item in items] != list(range(len(items))):
                raise ValueError("embedding indexes are not 0..n-1")
            vectors = [_vector(item["embedding"]) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise _Fatal(
                f"the server at {self.display_url} returned malformed JSON ({type(exc).__name__}); "
                "is base_url an OpenAI-compatible /v1 endpoint?",
                200,
            ) from None
        if len(vectors) != expected:
            raise _Fatal(
                f"the server at {self.display_url} returned {len(vectors)} embedding(s) for {expected} input(s); "
                "lower batch_size if it caps inputs per request",
                200,
            )
        wrong = sorted({len(v) for v in vectors} - {self.dimension})
        if wrong:
            raise _Fatal(
                f"the server at {self.display_url} returned {wrong[0]}-d vectors but the model version declares "
                f"dimension {self.dimension}; fix dimension (or the dimensions request setting) under a new key",
                200,
            )
        usage = document.get("usage") if isinstance(document, dict) else None
        tokens = usage.get("total_tokens", usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        if isinstance(tokens, int):
            with self._lock:
                self.cost.tokens = (self.cost.tokens or 0) + tokens
        return np.asarray(vectors, dtype=np.float32)


def _url_secrets(url: str) -> list[str]:
    """The password (or token) in a URL's user part, raw and percent-decoded."""
    from urllib.parse import unquote

    userinfo = url.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2] or userinfo
    return [password, unquote(password)] if password else []


def _vector(embedding: object) -> list[float] | np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    if not isinstance(embedding, list) or not all(isinstance(x, int | float) for x in embedding):
        raise TypeError("embedding is not a list of numbers")
    return embedding


def _server_message(body: object) -> str:
    """The server's own error message, whitespace collapsed (whole: redact it before shortening)."""
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
    else:
        message = body
    return " ".join(str(message or "").split())
