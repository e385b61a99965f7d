"""Transport-level bounds against a real server on loopback (server/limits.py).

Raw sockets where a well-behaved client (httpx) cannot misbehave: chunked bodies over the limit, a body held back
until the answer to its headers is read, bodies and headers that stop arriving. Every wait has a deadline; no
test asserts how long anything took.
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.serving import metric_value, running_server, tiny_checkpoint

KEY = "key-t"
AUTH = f"Authorization: Bearer {KEY}\r\n"
DEADLINE = 15.0  # seconds a test waits for an answer or a close; the server's timeouts are 1 s


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    with running_server(checkpoint, "--header-timeout", "1", "--body-timeout", "1", "--max-body-bytes", "2000",
                        "--api-key", KEY) as base:
        yield base


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the body"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection within the socket's timeout (False: still open at the deadline)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=DEADLINE).text


def slow_clients(text: str, phase: str) -> float:
    return metric_value(text, "crsm_slow_clients_total", phase=phase)


def errors(text: str, status: int) -> float:
    try:
        return metric_value(text, "crsm_request_errors_total", status=str(status))
    except KeyError:  # no such answer yet
        return 0.0


def completion_works(url: str) -> bool:
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=DEADLINE)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_chunked_body_over_the_limit_gets_413_and_the_server_stays_healthy(url):
    before = errors(metrics(url), 413)
    body = json.dumps({"prompt": "y" * 3000, "max_tokens": 1}).encode()  # a valid request, but 3000+ bytes
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500]) for i in range(0, len(body), 500))
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH.encode()
                     + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        status, headers, answer = read_response(sock)
        assert status == 413
        error = json.loads(answer)["error"]
        assert error["message"] == "request body over 2000 bytes" and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
        assert headers.get("connection") == "close" and closed_by_server(sock)
    assert errors(metrics(url), 413) == before + 1
    assert httpx.get(url + "/health", timeout=DEADLINE).status_code == 200
    assert completion_works(url)


@pytest.mark.parametrize("length", [1500, 100_000])  # under the body limit and over it: the key comes first
def test_a_wrong_key_gets_401_before_the_body_is_sent(url, length):
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
        status, headers, answer = read_response(sock)  # not a body byte sent
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert json.loads(answer)["error"]["code"] == "invalid_api_key"
        assert headers.get("connection") == "close" and closed_by_server(sock)
    assert completion_works(url)  # the right key still gets in


def test_a_body_that_stops_arriving_gets_408_and_is_counted(url):
    before = metrics(url)
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH.encode()
                     + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                     + b'{"prompt": "ab')  # 14 bytes of the 500 announced
        status, headers, answer = read_response(sock)
        assert status == 408
        assert json.loads(answer)["error"]["code"] == "body_timeout"
        assert headers.get("connection") == "close" and closed_by_server(sock)
    after = metrics(url)
    assert slow_clients(after, "body") == slow_clients(before, "body") + 1
    assert errors(after, 408) == errors(before, 408) + 1


def test_a_body_trickled_byte_by_byte_still_meets_one_deadline(url):
    """The body deadline is for the whole body, not per chunk: a byte every 0.3 s does not keep the request open."""
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH.encode()
                     + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n")
        give_up = time.monotonic() + DEADLINE
        while time.monotonic() < give_up and not select.select([sock], [], [], 0.3)[0]:
            try:
                sock.sendall(b" ")
            except OSError:  # closed by the server between the check and the send
                break
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 ")


def test_half_sent_headers_are_dropped_and_counted(url):
    before = slow_clients(metrics(url), "headers")
    with connect(url) as silent, connect(url) as half:
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")  # and never the rest
        assert closed_by_server(half)
        assert closed_by_server(silent)  # a connection that sends nothing at all
    assert slow_clients(metrics(url), "headers") == before + 2


def test_the_header_deadline_applies_to_a_later_request_on_a_kept_alive_connection(url):
    before = slow_clients(metrics(url), "headers")
    with connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # uvicorn's keep-alive timer stops at the first byte
        assert closed_by_server(sock)
    assert slow_clients(metrics(url), "headers") == before + 1


def test_stalled_clients_do_not_hold_up_others(url):
    stalled = [connect(url) for _ in range(3)]
    try:
        stalled[0].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
        stalled[1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH.encode()
                           + b"Content-Length: 500\r\n\r\n{")
        assert completion_works(url)  # served while the three stall
        assert all(closed_by_server(sock) for sock in stalled)  # and they do not stay
    finally:
        for sock in stalled:
            sock.close()
    assert completion_works(url)


def test_a_request_read_whole_keeps_its_connection(url):
    """Connection: close is only for answers sent before the body was read whole."""
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH.encode()
               + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with connect(url) as sock:
        for _ in range(2):
            sock.sendall(request)
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection") != "close"


@pytest.mark.parametrize("header, valid", [
    ("Bearer key-a", True), ("bearer key-b", True), ("Bearer  key-a", False), (None, False), ("", False),
    ("Bearer", False), ("Bearer ", False), ("Basic key-a", False), ("Bearer key-c", False), ("Bearer key-", False),
])
def test_key_is_valid_takes_the_key_exactly_as_sent(header, valid):
    from server.auth import key_is_valid

    assert key_is_valid(header, frozenset({"key-a", "key-b"})) is valid
    assert not key_is_valid(header, frozenset())
