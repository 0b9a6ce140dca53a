"""A counting HTTP proxy in front of an S3-compatible server, for ``iwae-pipeline bench --scale``.

Every process of a command (the driver, every Ray worker) talks to the object store; the proxy
sees each request they make, retries included, which is what object storage bills and throttles.
It counts them by kind (the key's first folders: ``leases``, ``tables/eval``, ``runs``, ...) and by
method, and forwards each one unchanged: headers (a HEAD's ``Content-Length`` too), body and status.

The tests put fault injection on top (:meth:`CountingProxy.fault`, overridden in ``tests/faults``);
the product only counts.
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def kind_of(path: str) -> str:
    """What a request touches, from its path ``/bucket/prefix.../key``: the part after the results
    prefix that names the kind of object (``leases``, ``tables/eval``, ``runs``, ``_check``, ...)."""
    parts = [p for p in urlparse(path).path.split("/") if p]
    for i, p in enumerate(parts):
        if p == "tables" and i + 1 < len(parts):
            return f"tables/{parts[i + 1]}"
        if p in ("leases", "runs", "_check", "_clock", "_quarantine", "report", "_iwae-pipeline.json"):
            return p
    return "listing" if "list-type" in path or "prefix=" in path else "other"


class CountingProxy:
    """A proxy on 127.0.0.1 (``endpoint``: ``HOST:PORT``) forwarding to ``upstream`` (``HOST:PORT``)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, kind) -> requests
        self.times: list[tuple[float, str, str]] = []  # (monotonic time, method, kind) of every request
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="s3-proxy")
        self.thread.start()

    # ------------------------------------------------------------------ what the tests override

    def fault(self, method: str, path: str) -> str | None:
        """``None`` to forward the request; ``"503"`` to answer 503 SlowDown; ``"drop"`` to close the
        connection without an answer; ``"403"`` to answer Access Denied."""
        return None

    # ------------------------------------------------------------------ counting

    def total(self, kind: str | None = None) -> int:
        with self.lock:
            return sum(n for (_, k), n in self.counts.items() if kind is None or k == kind)

    def snapshot(self) -> collections.Counter[tuple[str, str]]:
        with self.lock:
            return collections.Counter(self.counts)

    def since(self, t0: float, kind: str | None = None) -> int:
        """Requests (of ``kind``) since monotonic time ``t0``."""
        with self.lock:
            return sum(1 for t, _, k in self.times if t >= t0 and (kind is None or k == kind))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ forwarding

    def _body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length", "0") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method, kind = h.command, kind_of(h.path)
        body = self._body(h)
        with self.lock:
            self.counts[(method, kind)] += 1
            self.times.append((time.monotonic(), method, kind))
        what = self.fault(method, h.path)
        if what == "drop":
            h.close_connection = True
            try:
                h.connection.shutdown(2)
            except OSError:
                pass
            return
        if what in ("503", "403"):
            code, err = (503, "SlowDown") if what == "503" else (403, "AccessDenied")
            payload = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{err}</Code><Message>{err} (proxy)</Message></Error>'.encode()
            h.send_response(code)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if body or "Content-Length" in h.headers or h.headers.get("Transfer-Encoding"):
            headers["Content-Length"] = str(len(body))
        host, port = self.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(method, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status, resp.reason)
            length_sent = False
            for k, v in resp.getheaders():
                if k.lower() in _HOP:
                    continue
                if k.lower() == "content-length":
                    length_sent = True
                h.send_header(k, v)
            if not length_sent:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if method != "HEAD" and data:
                h.wfile.write(data)
        finally:
            conn.close()
