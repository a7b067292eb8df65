"""Loopback servers for the alerting integration tests: HTTP that records, HTTP that hangs,
a refused port, SMTP (aiosmtpd) plain, STARTTLS and implicit TLS with a self-signed cert.

Helpers only; the tests that use them are in `test_alerting_notifiers.py` and
`test_alerting_pipeline.py`. The servers' own sanity tests are at the bottom.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from tests.support.ports import LOOPBACK, free_port

# -- HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingHTTPServer:
    """Answers every request with the next status of `statuses` (then 200) and records it."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[Recorded] = []
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer._cond:
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    outer.requests.append(
                        Recorded(
                            "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                        )
                    )
                    outer._cond.notify_all()
                reply = b"ok" if status < 400 else b"invalid_payload"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout):
                pytest.fail(f"expected {count} requests, got {len(self.requests)}")
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class HangingServer:
    """Accepts TCP connections and never reads or answers."""

    def __init__(self) -> None:
        self._sock = socket.create_server((LOOPBACK, 0))
        self._sock.settimeout(0.05)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        return len(self._conns)

    def url(self, path: str = "/hook") -> str:
        return f"http://{LOOPBACK}:{self._sock.getsockname()[1]}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for conn in self._conns:
            conn.close()


@contextmanager
def refused_url(path: str = "/hook") -> Iterator[str]:
    """A URL whose port is bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    try:
        yield f"http://{LOOPBACK}:{sock.getsockname()[1]}{path}"
    finally:
        sock.close()


# -- SMTP ----------------------------------------------------------------------------------------


class RecordingSMTPHandler:
    """aiosmtpd handler that keeps every accepted message."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.sessions: list[tuple[bool, bool]] = []  # (over TLS, authenticated) per message
        self._cond = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._cond:
            self.envelopes.append(envelope)
            # STARTTLS fills session.ssl; implicit TLS shows on the transport only.
            tls = session.ssl is not None or (
                server.transport.get_extra_info("ssl_object") is not None
            )
            self.sessions.append((tls, bool(session.authenticated)))
            self._cond.notify_all()
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.envelopes) >= count, timeout):
                pytest.fail(f"expected {count} e-mails, got {len(self.envelopes)}")
            return list(self.envelopes)

    @staticmethod
    def parse(envelope: Any) -> EmailMessage:
        message = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        return message


class Authenticator:
    """Accepts one user/password pair; records the logins tried."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.attempts: list[tuple[str, str]] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        self.attempts.append((login, password))
        # handled=False: aiosmtpd sends the 235/535 reply itself
        return AuthResult(success=(login, password) == (self.user, self.password), handled=False)


@contextmanager
def smtp_server(**kwargs: Any) -> Iterator[tuple[RecordingSMTPHandler, int]]:
    """A real aiosmtpd server on a free loopback port; kwargs go to `Controller`."""
    handler = RecordingSMTPHandler()
    port = free_port()
    controller = Controller(handler, hostname=LOOPBACK, port=port, **kwargs)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@dataclass(frozen=True)
class SelfSigned:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_self_signed(directory: Path) -> SelfSigned:
    """A certificate for 127.0.0.1/localhost, made by the `openssl` CLI (the venv has no
    `cryptography`); skips the calling test when `openssl` is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not found: cannot make a self-signed certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return SelfSigned(cert, key)


# -- the helpers' own checks ---------------------------------------------------------------------


def test_recording_server_records_and_answers_the_planned_statuses():
    server = RecordingHTTPServer(statuses=[503])
    try:
        with httpx.Client() as client:
            first = client.post(server.url("/a"), json={"n": 1})
            second = client.post(server.url("/b"), content=b"x")
        assert (first.status_code, second.status_code) == (503, 200)
        recorded = server.wait_for(2)
        assert [(r.path, r.body) for r in recorded] == [("/a", b'{"n":1}'), ("/b", b"x")]
    finally:
        server.close()


def test_hanging_server_accepts_and_never_answers():
    server = HangingServer()
    try:
        with httpx.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            client.post(server.url(), json={})
        assert server.accepted == 1
    finally:
        server.close()


def test_refused_url_refuses():
    with refused_url() as url, httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.post(url, json={})
