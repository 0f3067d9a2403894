"""HTTP/1.1 over a bare loopback socket, for what no client library will send: half-sent heads,
stalled bodies, malformed framing, `Expect: 100-continue` without sending the body."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from multidict import CIMultiDict


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    interim: list[int] = field(default_factory=list)
    """Statuses of 1xx responses that came first (100 Continue)."""


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_head(sock: socket.socket, buf: bytearray) -> tuple[int, CIMultiDict[str]]:
    """One response head from `buf` (refilled from the socket); the bytes after it stay in `buf`."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65_536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return int(status_line.split()[1]), headers


def read_response(sock: socket.socket, buf: bytearray | None = None) -> RawResponse:
    """The next final response (after any 1xx), its body read by Content-Length or to the close."""
    buf = bytearray() if buf is None else buf
    interim = []
    status, headers = read_head(sock, buf)
    while 100 <= status < 200:
        interim.append(status)
        status, headers = read_head(sock, buf)
    if "Content-Length" in headers:
        length = int(headers["Content-Length"])
        while len(buf) < length:
            chunk = sock.recv(65_536)
            if not chunk:
                break
            buf += chunk
        body, buf[:] = bytes(buf[:length]), buf[length:]
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = read_chunked(sock, buf)
    else:
        while chunk := sock.recv(65_536):
            buf += chunk
        body = bytes(buf)
    return RawResponse(status, headers, body, interim)


def read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65_536)
        size_line, _, rest = bytes(buf).partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            chunk = sock.recv(65_536)
            if not chunk:
                raise ConnectionError("closed inside a chunk")
            rest += chunk
        body += rest[:size]
        buf[:] = rest[size + 2:]
        if size == 0:
            return bytes(body)


def exchange(port: int, data: bytes) -> RawResponse:
    with connect(port) as sock:
        sock.sendall(data)
        return read_response(sock)


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long until the peer closes (EOF or reset), discarding what it sends; AssertionError past `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65_536):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
