"""The authentication state machines in memory, and the start-up exposure warning."""

from __future__ import annotations

import logging

import pytest
from helpers import LogCapture

from npgevent.errors import RemoteProtocolError
from npgevent.protocol.auth import (
    AuthError,
    ClientAuth,
    ControlCipher,
    PoolProver,
    PoolVerifier,
    ServerAuth,
)

KEY = b"correct horse battery staple"


def run(client_key: bytes = KEY, server_key: bytes = KEY, reply: str = "np://0@1024/-?npg=1#1 sha256:AB"):
    server, client = ServerAuth(server_key), ClientAuth(client_key)
    answer = client.answer(server.challenge())
    server.check_client(answer)
    return server, client, client.check_server(server.finish(reply))


def test_both_sides_prove_the_key_and_agree_on_keys():
    server, client, text = run()
    assert text == "np://0@1024/-?npg=1#1 sha256:AB"
    assert server.keys == client.keys and server.keys is not None
    assert len({server.keys.c2s, server.keys.s2c, server.keys.pool}) == 3


def test_a_wrong_key_fails_at_the_server_before_it_says_anything_keyed():
    server, client = ServerAuth(KEY), ClientAuth(b"x" * len(KEY))
    with pytest.raises(AuthError, match="did not prove"):
        server.check_client(client.answer(server.challenge()))


def test_a_server_without_the_key_fails_at_the_client():
    real, fake = ServerAuth(KEY), ServerAuth(b"y" * len(KEY))
    client = ClientAuth(KEY)
    answer = client.answer(real.challenge())
    real.check_client(answer)
    fake.cn, fake.sn = real.cn, real.sn  # a server that relays nonces but lacks the key
    with pytest.raises(AuthError, match="server did not prove"):
        client.check_server(fake.finish("np://0@1024/-#1 -"))


def test_altered_settlement_fails():
    server, client = ServerAuth(KEY), ClientAuth(KEY)
    server.check_client(client.answer(server.challenge()))
    line = server.finish("np://0@1024/-#1 sha256:AB").replace(b"#1", b"#0")
    with pytest.raises(AuthError):
        client.check_server(line)


def test_every_handshake_has_fresh_nonces_and_keys():
    a, b = run()[0], run()[0]
    assert a.sn != b.sn and a.keys != b.keys


@pytest.mark.parametrize("line", [b"", b"NPA1 \n", b"NPA1 !!!\n", b"garbage", b"NPA1 " + b"A" * 500 + b"\n"])
def test_malformed_challenges_are_auth_errors(line):
    with pytest.raises(AuthError):
        ClientAuth(KEY).answer(line)


def test_sealed_control_lines_reject_forgery_replay_and_reordering():
    keys = run()[0].keys
    assert keys is not None
    client = ControlCipher(keys.c2s, keys.s2c)
    server = ControlCipher(keys.s2c, keys.c2s)
    l1, l2 = client.seal_line(b"np://1.2.3.4:5/abcd#1"), client.seal_line(b"np://-/-#p")
    assert b"np://" not in l1  # nothing readable, nothing XORed with the key
    with pytest.raises(RemoteProtocolError):
        server.open_line(l2)  # out of order
    assert server.open_line(l1) == b"np://1.2.3.4:5/abcd#1"
    with pytest.raises(RemoteProtocolError):
        server.open_line(l1)  # replayed
    with pytest.raises(RemoteProtocolError):
        server.open_line(l2[:-5] + b"AAAA\n")  # altered
    assert server.open_line(l2) == b"np://-/-#p"  # the genuine next line still opens


def test_pool_proofs_are_single_use_and_keyed():
    keys = run()[0].keys
    assert keys is not None
    prover, verifier = PoolProver(keys.pool), PoolVerifier(keys.pool)
    proofs = [prover.proof() for _ in range(100)]
    assert all(verifier.check(p) for p in reversed(proofs))  # any order within the window
    assert not any(verifier.check(p) for p in proofs)  # never twice
    assert not PoolVerifier(b"\0" * 32).check(prover.proof())  # another session's key
    assert not verifier.check(b"\0" * 24) and not verifier.check(b"short")


def test_pool_verifier_memory_stays_bounded():
    prover, verifier = PoolProver(b"k" * 32), PoolVerifier(b"k" * 32)
    for _ in range(50_000):
        assert verifier.check(prover.proof())
    assert len(verifier._seen) <= 2 * 8192 + 1


@pytest.mark.parametrize(("url", "expect"), [
    ("server://0.0.0.0:10101/127.0.0.1:80", "Tunnel key not set"),
    ("server://k@0.0.0.0:10101/127.0.0.1:80?auth=1", "auth=1 on a server reachable beyond loopback"),
    ("server://k@:10101/127.0.0.1:80?auth=0", "auth=0 on a server reachable beyond loopback"),
    ("server://k@0.0.0.0:10101/127.0.0.1:80?auth=2", None),
    ("server://127.0.0.1:10101/127.0.0.1:80", None),
])
def test_exposed_servers_are_warned_once(url, expect):
    from npgevent.cores.common import Instance
    from npgevent.cores.server import warn_exposure
    from npgevent.log import ROOT, InstanceLog
    from npgevent.settings import resolve
    from npgevent.url import parse_url

    spec = parse_url(url)  # parsed only: nothing listens
    opts, _ = resolve("server", spec.query_map, {})
    capture = LogCapture()
    logging.getLogger(ROOT).addHandler(capture)
    try:
        inst = Instance(spec, opts, InstanceLog("info"))
        warn_exposure(inst)
        warn_exposure(inst)
        warns = [line for line in capture.lines if "WARN" in line]
        if expect is None:
            assert warns == []
        else:
            assert len(warns) == 1 and expect in warns[0]
    finally:
        logging.getLogger(ROOT).removeHandler(capture)
