"""A fault-injecting HTTP reverse proxy for an S3 endpoint (moto_server), for tests.

Point the daemons' ``CN_S3_ENDPOINT`` at :attr:`FaultProxy.endpoint_url`; requests are forwarded
to the real endpoint unless a :class:`Rule` matches (method + regex on the path, for its first
``count`` matches): ``fail`` answers with an S3 error (500/503) without forwarding, ``delay``
waits before forwarding, ``before`` runs a callback and then forwards (a test can overwrite the
stored object there: corruption "at rest"), ``corrupt`` flips a byte of the response body
(corruption "in flight"). Every request is recorded in :attr:`FaultProxy.log`.
"""
from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclass
class Rule:
    method: str                       # "GET", "PUT", "HEAD", "POST", "DELETE" or "*"
    path: str                         # regex searched in the request path (with the query)
    action: str                       # fail | delay | before | corrupt
    count: int = 1                    # how many matching requests it applies to
    status: int = 503
    delay_s: float = 0.0
    callback: Callable[[str, str], None] | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.count and self.method in ("*", method) and re.search(self.path, path) is not None


@dataclass
class Record:
    method: str
    path: str
    status: int
    action: str = "forward"


@dataclass
class FaultProxy:
    upstream: str                                  # e.g. http://127.0.0.1:5000
    rules: list[Rule] = field(default_factory=list)
    log: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def injected(self, action: str | None = None) -> list[Record]:
        return [r for r in self.log if r.action != "forward" and (action is None or r.action == action)]

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)) if not head else
                                 dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _serve(self) -> None:
                method, path = self.command, self.path
                body = self._body()
                rule = proxy._pick(method, path)
                action = rule.action if rule else "forward"
                if rule and rule.action == "fail":
                    code = _CODES.get(rule.status, "InternalError")
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>injected by the fault proxy</Message></Error>").encode()
                    proxy.log.append(Record(method, path, rule.status, action))
                    self._answer(rule.status, [("Content-Type", "application/xml")], xml, method == "HEAD")
                    return
                if rule and rule.action == "delay":
                    time.sleep(rule.delay_s)
                if rule and rule.action == "before" and rule.callback is not None:
                    rule.callback(method, path)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy._host, proxy._port, timeout=60)
                try:
                    conn.request(method, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, out_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if rule and rule.action == "corrupt" and data:
                    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
                proxy.log.append(Record(method, path, status, action))
                self._answer(status, out_headers, data, method == "HEAD")

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler
