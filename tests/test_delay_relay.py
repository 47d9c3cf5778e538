"""benchmarks/delay_relay.py: the link the link benchmark simulates. Round trips take the RTT (not
less, not much more), bytes arrive intact and in order, a pipelined burst pays one RTT rather than
one per message, and a close on either side reaches the other."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.delay_relay import DelayRelay

RTT_S = 0.1
SLACK_S = 0.08  # a loaded 2-core CI machine: timers and threads may run late


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def relay() -> Iterator[DelayRelay]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with DelayRelay(0, "127.0.0.1", server.server_address[1], RTT_S) as relay:
        yield relay
    server.shutdown()
    server.server_close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return bytes(out)


def test_a_ping_takes_one_rtt(relay):
    with connect(relay.port) as sock:
        for _ in range(3):
            start = time.perf_counter()
            sock.sendall(b"x")
            assert receive(sock, 1) == b"x"
            elapsed = time.perf_counter() - start
            assert RTT_S <= elapsed < RTT_S + SLACK_S


def test_the_rtt_can_change_on_an_open_connection(relay):
    with connect(relay.port) as sock:
        relay.rtt_s = 0.0
        start = time.perf_counter()
        sock.sendall(b"x")
        assert receive(sock, 1) == b"x"
        assert time.perf_counter() - start < SLACK_S
        relay.rtt_s = RTT_S
        start = time.perf_counter()
        sock.sendall(b"x")
        assert receive(sock, 1) == b"x"
        assert time.perf_counter() - start >= RTT_S


def test_a_megabyte_arrives_intact_and_in_order(relay):
    payload = os.urandom(1 << 20)
    with connect(relay.port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive(sock, len(payload)) == payload
        sender.join()


def test_a_pipelined_burst_pays_one_rtt_not_one_per_message(relay):
    messages = 20
    with connect(relay.port) as sock:
        start = time.perf_counter()
        for i in range(messages):
            sock.sendall(b"%04d" % i)  # separate writes (TCP_NODELAY): separate chunks at the relay
        assert receive(sock, 4 * messages) == b"".join(b"%04d" % i for i in range(messages))
        elapsed = time.perf_counter() - start
    assert RTT_S <= elapsed < RTT_S + SLACK_S  # one message at a time would take 20 RTTs (2 s)


def test_a_half_close_goes_through_and_the_reply_comes_back(relay):
    with connect(relay.port) as sock:
        sock.sendall(b"ab")
        assert receive(sock, 2) == b"ab"
        sock.shutdown(socket.SHUT_WR)  # the echo server ends its loop on EOF and closes: that comes back
        start = time.perf_counter()
        assert sock.recv(1) == b""
        assert time.perf_counter() - start >= RTT_S


@pytest.mark.parametrize("closing", ["client", "server"])
def test_a_close_reaches_the_other_side(closing):
    listener = socket.create_server(("127.0.0.1", 0))
    with DelayRelay(0, "127.0.0.1", listener.getsockname()[1], RTT_S) as relay:
        client = connect(relay.port)
        server, _ = listener.accept()
        closed, other = (client, server) if closing == "client" else (server, client)
        start = time.perf_counter()
        closed.close()
        assert other.recv(1) == b""
        assert RTT_S / 2 <= time.perf_counter() - start < RTT_S / 2 + SLACK_S
        other.close()
    listener.close()


def test_an_unreachable_target_closes_the_client():
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with DelayRelay(0, "127.0.0.1", port, RTT_S) as relay, connect(relay.port) as sock:
        assert sock.recv(1) == b""
