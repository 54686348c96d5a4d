"""The relay's two directions ending at once (npgevent.relay.tcp)."""

from __future__ import annotations

import socket as stdsocket
import struct

import gevent
from gevent import socket
from helpers import tcp_pair

from npgevent.relay.tcp import relay


def _session(user: socket.socket, target: socket.socket, acct: list[int]) -> str:
    reason = relay(user, target, acct, 0, 1)
    gevent.sleep(0.02)  # what a handler does after its relay: must not be interrupted
    return reason


def test_an_error_on_one_side_never_reaches_the_caller_after_the_relay_returned():
    """The reverse direction fails (a reset) in the same loop turn in which the calling
    direction ends (EOF): the relay returns, and nothing thrown for it may hit the calling
    greenlet afterwards (it used to: ``_Abort`` arrived in whatever the caller did next)."""
    outcomes = []
    for i in range(30):
        user_near, user_far = tcp_pair()
        target_near, target_far = tcp_pair()
        acct = [0] * 4

        g = gevent.spawn(_session, user_far, target_near, acct)
        gevent.sleep(0.01)  # both pumps wait on their reads
        target_far.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        if i % 2:  # which of the two the loop sees first varies: try both orders
            target_far.close()  # RST: the reverse direction fails
            user_near.shutdown(socket.SHUT_WR)  # EOF: the calling direction ends
        else:
            user_near.shutdown(socket.SHUT_WR)
            target_far.close()
        g.join(timeout=5)
        outcomes.append(g.successful())
        for s in (user_near, user_far, target_near):
            s.close()
    assert all(outcomes), "%d of 30 sessions hit by a late abort" % outcomes.count(False)
