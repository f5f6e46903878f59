"""A real HTTP listener on 127.0.0.1 that records webhook requests (for the notification tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    """One request as received."""

    path: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"


@dataclass
class Listener:
    """What the listener got, and the statuses it answers with (then 200)."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    https: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}/lungnode"


@contextmanager
def webhook_listener(statuses: list[int] | None = None,
                     tls: tuple[str, str] | None = None) -> Iterator[Listener]:
    """Serve on a free port; answer each POST with the next of ``statuses`` (then 200).

    A 3xx status redirects to ``/moved``, where a GET is answered ``200`` with ``[{}]`` (what a
    client that follows the redirect would take for an answer). ``tls``: (certificate PEM, key
    PEM) to serve HTTPS.
    """
    state = Listener(statuses=list(statuses or []), https=tls is not None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers.items()), body))
                code = state.statuses.pop(0) if state.statuses else 200
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", "/moved")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def do_GET(self) -> None:
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers.items()), b"", "GET"))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"[{}]")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class MllpListener:
    """What the MLLP listener got, and the MSA-1 codes it answers with (then ``AA``)."""

    port: int = 0
    messages: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"mllp://127.0.0.1:{self.port}"


@contextmanager
def mllp_listener(codes: list[str] | None = None) -> Iterator[MllpListener]:
    """A real MLLP (HL7 v2) receiver on a free port that acknowledges each message."""
    import socket

    state = MllpListener(codes=list(codes or []))
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    state.port = int(server.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                data = b""
                while b"\x1c\r" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                message = data.strip(b"\x0b").split(b"\x1c\r")[0].decode()
                state.messages.append(message)
                control = message.split("\r")[0].split("|")[9]
                code = state.codes.pop(0) if state.codes else "AA"
                ack = f"MSH|^~\\&|RIS||LUNGNODE||20240101||ACK^R01|A{control}|P|2.5.1\rMSA|{code}|{control}\r"
                conn.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(2)
        server.close()
