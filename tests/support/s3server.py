"""A real S3 protocol server on loopback for tests and benchmarks: moto's server mode.

:class:`S3Server` runs ``python -m moto.server`` in a child process on 127.0.0.1 at a
free port, so clients talk to it over HTTP exactly as they would to S3 (s3fs ->
aiobotocore -> aiohttp), and the server's CPU work does not share our GIL.
:class:`FaultProxy` is a small HTTP proxy put in front of it that answers a share of
requests with a transient error (503 SlowDown by default) instead of forwarding them.

Tests get the shared server through the ``s3`` fixture (tests/conftest.py offers it to
every test module); S3 tests are skipped, with the reason, when moto is not installed. Nothing here mocks the S3 client.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# Fake credentials for the local server. They are deliberately distinctive so tests can
# assert that they never appear in an error message.
ACCESS_KEY_ID = "AKIASHARDCKPTTEST01"
SECRET_ACCESS_KEY = "shardckpt-test-secret-Zq7vXk2m9PwL"
REGION = "us-east-1"


def moto_available() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """``python -m moto.server`` on 127.0.0.1:<free port>. ``stop()`` ends it."""

    def __init__(self, *, extra_env: dict[str, str] | None = None, start_timeout_s: float = 30.0) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._admin: Any = None
        env = dict(os.environ)
        # Objects stay in memory up to 256 MiB (moto's default spills anything over
        # 5 MiB to a temp file on our noisy disk).
        env.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(256 * 2**20))
        env.update(extra_env or {})
        # The server logs every request: to a file, never a pipe nobody drains (a full
        # pipe blocks its logging lock, and with it every request thread).
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise RuntimeError(f"moto server exited with {self._proc.returncode} at start:\n{err[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/moto-api/data.json")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server on port {self.port} not ready after {timeout_s} s")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def storage_options(self, endpoint_url: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Explicit fsspec/s3fs options for this server, as a user of MinIO would pass them."""
        options: dict[str, Any] = {
            "endpoint_url": endpoint_url or self.endpoint_url,
            "key": ACCESS_KEY_ID,
            "secret": SECRET_ACCESS_KEY,
            "client_kwargs": {"region_name": REGION},
        }
        options.update(overrides)
        return options

    def create_user(
        self, policy: dict[str, Any], as_user: tuple[str, str] = ("bootstrap", "bootstrap")
    ) -> tuple[str, str]:
        """An IAM user with ``policy`` and its (access key id, secret), created with the
        credentials ``as_user``. Policies are only checked by a server started with
        ``extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}``: moto then enforces signatures
        and policies after that many unauthenticated requests (one create_user)."""
        import json

        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=as_user[0],
            aws_secret_access_key=as_user[1],
            region_name=REGION,
        )
        name = f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point any AWS client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def create_bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket (through s3fs, over HTTP) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.admin().call_s3("create_bucket", Bucket=name)  # no LocationConstraint: us-east-1 refuses one
        return name

    def admin(self) -> Any:
        """An s3fs client of its own (not shared with the code under test)."""
        if self._admin is None:
            import s3fs

            self._admin = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
        return self._admin


_shared: S3Server | None = None
_shared_lock = threading.Lock()


def shared_server() -> S3Server:
    """One server per test process, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = S3Server()
            import atexit

            atexit.register(_shared.stop)
        return _shared


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The shared moto server; skips the test when moto[server] is not installed."""
    if not moto_available():
        pytest.skip("moto is not installed: `pip install -e '.[test]'` installs moto[server] for the S3 tests")
    yield shared_server()


# ----------------------------------------------------------------- fault injection


_HOP_HEADERS = ("connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream_port`` that injects errors.

    A request is answered with ``status`` and an S3 error body carrying ``code``,
    instead of being forwarded, when ``fail(n, method, path)`` is true (``n`` counts
    requests from 1 over all connections; ``path`` includes the query). By default every
    ``every_nth`` request fails; ``every_nth=0`` forwards everything. The proxy reads the
    whole request first, as S3 does, so a refused upload leaves nothing on the server;
    with ``forward_failed`` a failing request is carried out first and only its answer
    is lost (the server did the work, the client sees an error).
    ``fail`` may also return a fault of its own: a ``(status, code)`` pair, or
    ``"drop"`` (close the connection without an answer, the server saw nothing) or
    ``"drop-after"`` (forward, then close without an answer: the work was done).
    ``requests`` and ``faults`` count what went through; ``log`` keeps (method, path,
    injected status, -1 for a drop, or 0) and ``copies`` whether each request was a
    server-side copy.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        every_nth: int = 0,
        status: int = 503,
        code: str = "SlowDown",
        fail: Callable[[int, str, str], bool] | None = None,
        forward_failed: bool = False,
    ) -> None:
        self.upstream_port = upstream_port
        self.forward_failed = forward_failed
        self.status = status
        self.code = code
        self.fail = fail or (lambda n, method, path: every_nth > 0 and n % every_nth == 0)
        self.faults = 0
        self.requests = 0
        self.log: list[tuple[str, str, int]] = []
        self.copies: list[bool] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _should_fail(self, method: str, path: str) -> Any:
        """False, or the fault: (status, code), "drop" or "drop-after"."""
        with self._lock:
            n = next(self._counter)
            self.requests += 1
            verdict = self.fail(n, method, path)
            if verdict is True:
                verdict = (self.status, self.code)
            failed = bool(verdict)
            self.faults += failed
            status = 0 if not failed else -1 if isinstance(verdict, str) else verdict[0]
            self.log.append((method, path, status))
            return verdict if failed else False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _relay(self) -> None:
                body = self._body()
                proxy.copies.append("x-amz-copy-source" in (k.lower() for k in self.headers))
                fault = proxy._should_fail(self.command, self.path)
                if fault in ("drop", "drop-after"):
                    if fault == "drop-after":
                        self._forward(body)
                    self.close_connection = True  # no answer at all: the client sees the socket close
                    return
                if fault:
                    status, code = fault
                    if proxy.forward_failed:
                        self._forward(body)
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected fault</Message><RequestId>fault</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body; one would poison the connection
                        self.wfile.write(payload)
                    return
                resp, data = self._forward(body)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_HEADERS and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    return resp, resp.read()
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
