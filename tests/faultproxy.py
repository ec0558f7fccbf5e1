"""A fault-injecting HTTP/1.1 proxy for tests: put it in front of a real S3 server (moto) on loopback.

Each request the client sends is, by one draw of a seeded RNG:

* answered **503 SlowDown** (a proper S3 XML error body, ``<Code>SlowDown</Code>``) without
  reaching the server, with probability ``slowdown``;
* **dropped**, with probability ``drop``, in one of three ways (equally likely):

  - ``refused``: the request is read, never forwarded, and the connection is closed with no
    response (the server never sees it);
  - ``lost_reply``: the request is forwarded and the server applies it, then the connection is
    closed with no response (the client cannot know that its PUT/DELETE landed);
  - ``reset``: the request is forwarded, a random leading part of the response (inside the
    status line, the headers or the body) is sent, and the connection is reset (RST);

* otherwise forwarded unchanged.

``rule(method, path)`` (optional) scripts faults for targeted tests: it returns ``"slowdown"``,
``"refused"``, ``"lost_reply"``, ``"reset"``, ``"reset_body"`` (a reset whose cut falls inside the
body, after the headers, when there is a body), ``"forward"``, or None to leave the request to the
random draw. Scripted faults are counted like random ones.

Forwarding is faithful, so that with both rates at 0 the proxy is transparent: the
method, target, every header but the hop-by-hop ones (``Connection``, ``Keep-Alive``,
``Proxy-*``, ``TE``, ``Upgrade``; ``Expect: 100-continue`` is answered here, as the
client's peer) in their order and spelling, and the body byte for byte. A request body
framed by ``Content-Length`` is sent with that length; one framed by
``Transfer-Encoding: chunked`` (streaming uploads) is passed on in its chunked framing,
chunk extensions and trailers included. The response is passed back with its status,
reason and headers (``Content-Length``, ``Content-Range`` of Range requests, ``ETag`` ...);
a chunked response body is passed on as one ``Content-Length`` body (same bytes). A HEAD
response keeps the server's ``Content-Length`` and has no body. Client connections are
kept alive (HTTP/1.1); each forwarded request opens its own connection to the server.

Counters (read them after the run; ``snapshot()`` gives a consistent copy): ``requests``
(every request read from a client), ``forwarded`` (reached the server), ``slowdowns``,
``drops`` (and ``drops_by_kind``), ``by_method``. ``faults_by_method`` counts injected faults
per HTTP method (503s and drops together). The RNG is seeded, but concurrent clients
reach it in an order the scheduler decides, so a seed fixes the fault *rates*, not which
request gets which fault.

    with FaultProxy("http://127.0.0.1:5000", slowdown=0.25, drop=0.05, seed=1) as proxy:
        ...  # point the client at proxy.url
        assert proxy.slowdowns > 0
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

#: Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1), never forwarded.
#: ``Transfer-Encoding`` is handled separately (the request's is kept with its chunked body).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "upgrade", "expect"})
DROP_KINDS: tuple[str, ...] = ("refused", "lost_reply", "reset")
#: What a ``rule`` may return (besides None).
RULE_ACTIONS: tuple[str, ...] = ("slowdown", "forward", *DROP_KINDS, "reset_body")

SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>faultproxy</HostId></Error>"
)

_NO_BODY_STATUSES = {204, 304}


class _Dropped(Exception):
    """The client closed its connection in the middle of a request (nothing to answer)."""


class FaultProxy:
    """A threaded loopback proxy to ``upstream`` (``http://host:port``) that injects 503s and dropped connections."""

    def __init__(self, upstream: str, *, slowdown: float = 0.25, drop: float = 0.05, seed: int = 0,
                 drop_kinds: tuple[str, ...] = DROP_KINDS, rule=None, host: str = "127.0.0.1", port: int = 0,
                 upstream_timeout_s: float = 60.0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream: expected http://host:port, got {upstream!r}")
        if not (0 <= slowdown and 0 <= drop and slowdown + drop <= 1):
            raise ValueError(f"rates: expected slowdown, drop >= 0 with slowdown + drop <= 1, got {slowdown}, {drop}")
        unknown = set(drop_kinds) - set(DROP_KINDS)
        if unknown or not drop_kinds:
            raise ValueError(f"drop_kinds: expected a non-empty subset of {DROP_KINDS}, got {drop_kinds}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.upstream_timeout_s = upstream_timeout_s
        self.slowdown, self.drop, self.drop_kinds = float(slowdown), float(drop), tuple(drop_kinds)
        self.rule = rule
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = self.forwarded = self.slowdowns = self.drops = 0
        self.drops_by_kind: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()
        self.faults_by_method: Counter[str] = Counter()
        self.errors: list[str] = []  # proxy-side failures talking to the server (should stay empty)
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- life cycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy {self.url}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_rates(self, *, slowdown: float | None = None, drop: float | None = None) -> None:
        """Change the rates while running (e.g. 0 for a fault-free phase)."""
        with self._lock:
            if slowdown is not None:
                self.slowdown = float(slowdown)
            if drop is not None:
                self.drop = float(drop)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "forwarded": self.forwarded, "slowdowns": self.slowdowns,
                    "drops": self.drops, "drops_by_kind": dict(self.drops_by_kind), "by_method": dict(self.by_method),
                    "faults_by_method": dict(self.faults_by_method), "errors": list(self.errors)}

    # -- decisions

    def _decide(self, method: str, path: str) -> tuple[str, str | None]:
        """``("slowdown" | "drop" | "forward", drop kind)`` for one request; counts it."""
        scripted = self.rule(method, path) if self.rule is not None else None
        if scripted is not None and scripted not in RULE_ACTIONS:
            raise ValueError(f"rule: expected one of {RULE_ACTIONS} or None, got {scripted!r}")
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
            if scripted == "forward":
                return "forward", None
            if scripted == "slowdown":
                self.slowdowns += 1
                self.faults_by_method[method] += 1
                return "slowdown", None
            if scripted is not None:
                self.drops += 1
                self.drops_by_kind[scripted] += 1
                self.faults_by_method[method] += 1
                return "drop", scripted
            u = self._rng.random()
            if u < self.slowdown:
                self.slowdowns += 1
                self.faults_by_method[method] += 1
                return "slowdown", None
            if u < self.slowdown + self.drop:
                kind = self._rng.choice(self.drop_kinds)
                self.drops += 1
                self.drops_by_kind[kind] += 1
                self.faults_by_method[method] += 1
                return "drop", kind
            return "forward", None

    def _cut(self, size: int, *, at_least: int = 1) -> int:
        """Where a reset cuts a response of ``size`` bytes: at least ``at_least`` bytes sent, at least 1 withheld."""
        with self._lock:
            return self._rng.randint(min(at_least, size - 1), max(1, size - 1))

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    # -- the handler

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue answered by handle_expect_100

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _read_body(self) -> tuple[bytes, bool]:
                """The request body as it came on the wire, and whether it is chunked."""
                encoding = ",".join(self.headers.get_all("Transfer-Encoding") or []).lower()
                if "chunked" in encoding:
                    return _read_chunked_raw(self.rfile), True
                length = self.headers.get("Content-Length")
                if length is None:
                    return b"", False
                n = int(length)
                data = self.rfile.read(n) if n else b""
                if len(data) != n:
                    raise _Dropped("client closed mid-body")
                return data, False

            def _forward(self, body: bytes, chunked: bool) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=proxy.upstream_timeout_s)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() in HOP_BY_HOP:
                            continue
                        conn.putheader(name, value)
                    conn.endheaders()
                    if body:
                        conn.send(body)  # the chunked framing as received, or exactly Content-Length bytes
                    response = conn.getresponse()
                    data = response.read()  # a HEAD response has no body (http.client knows the method)
                    with proxy._lock:
                        proxy.forwarded += 1
                    return response.status, response.reason, response.getheaders(), data
                finally:
                    conn.close()

            def _response_bytes(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> bytes:
                lines = [f"HTTP/1.1 {status} {reason}"]
                has_length = False
                for name, value in headers:
                    lower = name.lower()
                    if lower in HOP_BY_HOP or lower == "transfer-encoding":
                        continue
                    if lower == "content-length":
                        has_length = True
                        if self.command != "HEAD" and int(value) != len(data):
                            raise RuntimeError(f"server sent Content-Length {value} with {len(data)} bytes")
                    lines.append(f"{name}: {value}")
                if not has_length and status not in _NO_BODY_STATUSES and not 100 <= status < 200:
                    lines.append(f"Content-Length: {len(data)}")  # a chunked response, passed on whole
                if self.close_connection:
                    lines.append("Connection: close")
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                return head + (b"" if self.command == "HEAD" else data)

            def _reset(self, partial: bytes = b"") -> None:
                """Send ``partial`` then reset the connection (RST, not FIN)."""
                try:
                    if partial:
                        self.wfile.write(partial)
                        self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    self.connection.close()
                self.close_connection = True

            def _close_silently(self) -> None:
                """Close the connection (FIN) without a response."""
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                try:
                    body, chunked = self._read_body()
                except (_Dropped, ValueError, OSError):
                    self.close_connection = True
                    return
                action, kind = proxy._decide(self.command, self.path)
                if action == "slowdown":
                    rid = f"{random.getrandbits(64):016X}"
                    payload = SLOWDOWN_BODY.format(rid=rid).encode()
                    headers = [("Content-Type", "application/xml"), ("x-amz-request-id", rid),
                               ("Content-Length", str(len(payload)))]
                    self.wfile.write(self._response_bytes(503, "Slow Down", headers, payload))
                    self.wfile.flush()
                    return
                if action == "drop" and kind == "refused":
                    self._close_silently()
                    return
                try:
                    status, reason, headers, data = self._forward(body, chunked)
                except (OSError, http.client.HTTPException) as exc:
                    proxy._note_error(f"{self.command} {self.path}: {type(exc).__name__}: {exc}")
                    self._reset()
                    return
                if action == "drop" and kind == "lost_reply":
                    self._close_silently()
                    return
                wire = self._response_bytes(status, reason, headers, data)
                if action == "drop":  # reset mid-response (reset_body: inside the body, when there is one)
                    body_at = len(wire) - len(data) if kind == "reset_body" and data and self.command != "HEAD" else 1
                    self._reset(wire[:proxy._cut(len(wire), at_least=body_at)])
                    return
                self.wfile.write(wire)
                self.wfile.flush()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

        return Handler


def _read_chunked_raw(rfile) -> bytes:
    """A chunked body read from ``rfile`` with its framing kept (chunk sizes, extensions, trailers)."""
    out = bytearray()
    while True:
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise _Dropped("client closed mid-chunk")
        out += line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        data = rfile.read(size + 2)  # the chunk and its CRLF
        if len(data) != size + 2:
            raise _Dropped("client closed mid-chunk")
        out += data
    while True:  # trailers, up to the empty line
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise _Dropped("client closed in the trailers")
        out += line
        if line in (b"\r\n", b"\n"):
            return bytes(out)


__all__ = ["DROP_KINDS", "RULE_ACTIONS", "SLOWDOWN_BODY", "FaultProxy"]
