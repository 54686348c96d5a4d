"""The master API and its state file against hostile and careless input (real processes).

Each attack is a small client in the test; each test then shows the master still
serving, nothing lost, and no traceback in its output.
"""

from __future__ import annotations

import json
import os
import time

import gevent
import pytest
from gevent import socket
from helpers import MasterProcess, free_port

pytestmark = pytest.mark.timeout(120)


def no_tracebacks(master: MasterProcess) -> None:
    assert master.count(r"Traceback|Internal server error|API error") == 0, master.output[-4000:]


def raw_request(port: int, data: bytes, read: bool = True, timeout: float = 10.0) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        sock.close()


def post_raw(master: MasterProcess, path: str, body: bytes) -> tuple[int, bytes]:
    head = ("POST %s%s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nConnection: close\r\n\r\n" % (master.base, path, master.key, len(body)))
    answer = raw_request(master.port, head.encode() + body)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.fixture
def master(tmp_path):
    m = MasterProcess(tmp_path / "state", env={"NP_HTTP_IDLE_TIMEOUT": "2s", "NP_HTTP_HEADER_TIMEOUT": "2s",
                                               "NP_HTTP_BODY_TIMEOUT": "2s", "NP_HTTP_MAX_CONNS_PER_IP": "20"})
    try:
        yield m
    finally:
        m.stop()
        m.close()


# -- request bodies -------------------------------------------------------------------------


def test_lone_surrogates_are_stored_as_replacement_characters_and_saved(master, tmp_path):
    """Go's decoder turns a lone surrogate into U+FFFD: so does npgevent, and every later
    request, every save and the shutdown keep working."""
    status, body = post_raw(master, "/instances", b'{"url":"client://127.0.0.1:1/\\ud800x:80"}')
    assert status == 201, body
    iid = json.loads(body)["id"]
    assert "\ufffd" in json.loads(body)["url"]
    status, _ = post_raw(master, "/info", b'{"alias":"\\udfff master"}')
    assert status == 200
    r = master.api("PATCH", "/instances/" + iid, {"alias": "x"})
    assert r.status == 200
    status, _ = post_raw(master, "/instances/" + iid, b"")  # 405, not a crash
    patch = ('PATCH %s/instances/%s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n'
             'Connection: close\r\n\r\n')
    body = b'{"meta":{"tags":{"\\ud83d":"\\udc00"},"peer":{"alias":"\\ud800"}}}'
    answer = raw_request(master.port, (patch % (master.base, iid, master.key, len(body))).encode() + body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert master.api("GET", "/instances").status == 200
    assert master.api("GET", "/info").status == 200
    no_tracebacks(master)
    # the change was saved: a restarted master has it
    master.stop()
    saved = json.loads((tmp_path / "state" / "npgevent.json").read_text(encoding="utf-8"))
    rec = next(r for r in saved["records"] if r["id"] == iid)
    assert rec["meta"]["tags"] == {"\ufffd": "\ufffd"} and rec["meta"]["peer"]["alias"] == "\ufffd"
    again = MasterProcess(tmp_path / "state")
    try:
        assert iid in [r["id"] for r in again.api("GET", "/instances").json]
        no_tracebacks(again)
    finally:
        again.stop()
        again.close()


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,
    b'{"url":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"alias":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
], ids=["array-100000", "url-5000", "object-3000"])
def test_deeply_nested_json_is_a_bad_request(master, body):
    status, _ = post_raw(master, "/instances", body)
    assert status == 400
    assert master.api("GET", "/instances").status == 200
    no_tracebacks(master)


def test_url_over_the_limit_is_refused(master):
    url = "client://127.0.0.1:1/127.0.0.1:2?x=" + "a" * 900_000
    r = master.api("POST", "/instances", {"url": url})
    assert r.status == 400 and "maximum length" in r.json["error"]
    assert len(master.api("GET", "/instances").json) == 1  # only the API key record


def test_chunked_body_cut_mid_chunk(master):
    head = ("POST %s/instances HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (master.base, master.key)).encode()
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    sock.sendall(head + b"100\r\n" + b'{"url":"client://')
    sock.close()  # cut in the middle of the chunk
    gevent.sleep(0.3)
    assert master.api("GET", "/instances").status == 200
    no_tracebacks(master)


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "127.0.0.1:\u0663\u0663", "127.0.0.1:" + "9" * 5000,
                                    "[::1]:-1", ":"], ids=["99999", "arabic", "5000-digits", "negative", "colon"])
def test_tcping_with_a_bad_port_answers_like_go(master, target):
    from urllib.parse import quote

    r = master.api("GET", "/tcping?target=" + quote(target))
    assert r.status == 200 and r.json["connected"] is False and r.json["error"]
    no_tracebacks(master)


# -- the HTTP server itself -------------------------------------------------------------------


def test_idle_connections_are_closed(master):
    socks = [socket.create_connection(("127.0.0.1", master.port), timeout=10) for _ in range(15)]
    try:
        began = time.monotonic()
        for s in socks:
            assert s.recv(100) == b""  # closed by the server (header deadline 2 s)
        assert time.monotonic() - began < 8
        assert master.api("GET", "/instances").status == 200
    finally:
        for s in socks:
            s.close()


def test_a_trickled_body_is_cut_off(master):
    head = ("POST %s/instances HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: 1000\r\n\r\n"
            % (master.base, master.key)).encode()
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    try:
        sock.sendall(head)
        began = time.monotonic()
        answer = b""
        try:
            for _ in range(40):  # one byte every 0.2 s: the 2 s body deadline ends it
                sock.sendall(b"{")
                gevent.sleep(0.2)
        except OSError:
            pass
        sock.settimeout(5)
        try:
            answer = sock.recv(1000)
        except OSError:
            pass
        assert answer.startswith(b"HTTP/1.1 400") or answer == b""
        assert time.monotonic() - began < 9
    finally:
        sock.close()
    assert master.api("GET", "/instances").status == 200
    no_tracebacks(master)


def test_an_endless_body_after_an_error_is_not_drained(master):
    """A 401 goes out and the connection is closed, instead of reading an endless body."""
    head = ("POST %s/instances HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nTransfer-Encoding: chunked\r\n\r\n"
            % master.base).encode()
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    sent = 0
    try:
        sock.sendall(head)
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        began = time.monotonic()
        try:
            while time.monotonic() - began < 5:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: good
    finally:
        sock.close()
    assert sent < 64 << 20, "the server kept reading %d bytes after its answer" % sent
    assert master.api("GET", "/instances").status == 200


def test_more_than_100_headers_is_a_quiet_bad_request(master):
    head = "GET %s/instances HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n" % (master.base, master.key)
    head += "".join("X-H%d: v\r\n" % i for i in range(150)) + "\r\n"
    for _ in range(3):
        answer = raw_request(master.port, head.encode())
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    no_tracebacks(master)


def test_connections_per_address_are_capped(master):
    held = []
    try:
        for _ in range(25):
            held.append(socket.create_connection(("127.0.0.1", master.port), timeout=5))
        gevent.sleep(0.3)
        closed = 0
        for s in held[20:]:
            s.settimeout(1)
            try:
                if s.recv(10) == b"":
                    closed += 1
            except socket.timeout:
                pass
        assert closed == 5  # over the cap of 20: closed at once
        assert "refused" in master.output
    finally:
        for s in held:
            s.close()
    gevent.sleep(0.3)
    assert master.api("GET", "/instances").status == 200


# -- the state file ---------------------------------------------------------------------------


def good_state(key: str = "0" * 32) -> dict:
    return {"format": "npgevent-master", "version": 1, "records": [
        {"id": "********", "url": key, "config": "1" * 16},
        {"id": "aaaaaaaa", "type": "client", "url": "client://127.0.0.1:1/127.0.0.1:2", "config": "x"},
    ]}


def bad_record(state: dict, **fields) -> dict:
    rec = {"id": "bbbbbbbb", "type": "client", "url": "client://127.0.0.1:3/127.0.0.1:4"}
    rec.update(fields)
    state["records"].append(rec)
    return state


CORRUPT_FILES = {
    "records as a dict": lambda: {**good_state(), "records": {"a": 1}},
    "version 1e999": lambda: json.dumps(good_state()).replace('"version": 1', '"version": 1e999'),
    "nested 100000 deep": lambda: "[" * 100000 + "]" * 100000,
    "not json": lambda: "{{{",
}
BAD_RECORDS = {
    "records holding lists": lambda s: {**s, "records": [*s["records"], [1, 2]]},
    "meta as a string": lambda s: bad_record(s, meta="nope"),
    "tags as a list": lambda s: bad_record(s, meta={"tags": ["a"]}),
    "url that no longer parses": lambda s: bad_record(s, url="client://[::1/x"),
    "mode as a string": lambda s: bad_record(s, mode="1"),
}


def _write_state(directory, content) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / "npgevent.json").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("name", sorted(CORRUPT_FILES))
def test_an_unusable_state_file_is_moved_aside(tmp_path, name):
    state = tmp_path / "state"
    _write_state(state, CORRUPT_FILES[name]())
    m = MasterProcess(state)
    try:
        m.wait_for(r"ERROR  State file .* is unreadable .*moved to .*corrupt-")
        assert m.api("GET", "/instances").status == 200
        assert any(p.name.startswith("npgevent.json.corrupt-") for p in state.iterdir())
        no_tracebacks(m)
    finally:
        m.stop()
        m.close()


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_a_bad_record_is_skipped_and_the_rest_kept(tmp_path, name):
    state = tmp_path / "state"
    _write_state(state, BAD_RECORDS[name](good_state()))
    m = MasterProcess(state)
    try:
        m.wait_for(r"ERROR  State file .*: record .* skipped: ")
        ids = [r["id"] for r in m.api("GET", "/instances").json]
        assert "aaaaaaaa" in ids and "bbbbbbbb" not in ids
        assert m.key == "0" * 32  # the key survived
        no_tracebacks(m)
    finally:
        m.stop()
        m.close()


def test_an_empty_api_key_is_replaced_never_switched_off(tmp_path):
    state = tmp_path / "state"
    _write_state(state, good_state(key=""))
    m = MasterProcess(state)
    try:
        assert len(m.key) == 32 and m.key != ""
        assert m.api("GET", "/instances", key=None).status == 401
        assert m.api("GET", "/instances", key="").status == 401
        assert m.api("GET", "/instances").status == 200
        m.wait_for(r"WARN  API Key record in the state has no key")
    finally:
        m.stop()
        m.close()


# -- certificate files --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "dir"])
def test_tls2_with_a_file_that_is_not_a_regular_file(tmp_path, path):
    """/dev/zero (endless), a FIFO (blocks) and a directory: a clear error and the code-1
    fallback, at once, never a MemoryError or a hang."""
    from helpers import NpProcess

    if path == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif path == "dir":
        path = str(tmp_path)
    tport, uport = free_port(), free_port()
    url = "server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=2&crt=%s&key=%s" % (tport, uport, path, path)
    with NpProcess(url) as p:
        p.wait_for(r"ERROR  TLS code-2: cannot load .*(not a regular file|Is a directory).*falling back to code-1",
                   timeout=10)
        p.wait_for(r"Server started", timeout=5)
        assert p.count("Traceback|MemoryError") == 0
        assert p.stop() == 0
