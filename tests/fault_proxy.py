"""A fault-injecting reverse proxy on 127.0.0.1 for the S3 server: fails a share of requests with
500/503 (S3's SlowDown) or a reset connection, cuts large GET replies off halfway through their body when
asked (`cut_bodies`), and relays the rest unchanged.

A given request (method + path) fails at most `max_faults_per_request` times in a row, so a client
that retries a few times always gets through: the test is about retries, not luck. `drop_headers`
removes request headers on the way (say, the conditions of conditional writes: a storage that
ignores them).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, share: float = 0.15, seed: int = 0, max_faults_per_request: int = 2,
                 drop_headers: tuple[str, ...] = (), cut_bodies: int = 0, cut_from: int = 1 << 16,
                 cut_paths: str = ""):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.share = share
        self.rng = random.Random(seed)
        self.max_faults = max_faults_per_request
        self.lock = threading.Lock()
        self.faults: dict[str, int] = {}
        self.counts = {"relayed": 0, "500": 0, "503": 0, "reset": 0, "cut": 0}
        # The next `cut_bodies` GET replies of at least `cut_from` bytes (whose path contains `cut_paths`) stop
        # halfway through their body (the headers promise all of it), then the connection is reset; `gets`
        # records each GET's path and Range header.
        self.cut_bodies, self.cut_from, self.cut_paths = cut_bodies, cut_from, cut_paths
        self.gets: list[tuple[str, str | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                fault = proxy._pick(f"{self.command} {self.path}")
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    payload = SLOW_DOWN if fault == "503" else b"<Error><Code>InternalError</Code></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                dropped = {"transfer-encoding", *(h.lower() for h in drop_headers)}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length and no body.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "GET" and proxy._cut(self.path, self.headers.get("Range"), len(data)):
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pick(self, key: str) -> str | None:
        with self.lock:
            if self.faults.get(key, 0) < self.max_faults and self.rng.random() < self.share:
                self.faults[key] = self.faults.get(key, 0) + 1
                fault = self.rng.choice(["500", "503", "reset"])
            else:
                self.faults[key] = 0
                fault = None
            self.counts[fault or "relayed"] += 1
            return fault

    def _cut(self, path: str, byte_range: str | None, size: int) -> bool:
        with self.lock:
            self.gets.append((path, byte_range))
            if self.cut_bodies <= 0 or size < self.cut_from or self.cut_paths not in path:
                return False
            self.cut_bodies -= 1
            self.counts["cut"] += 1
            return True

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
