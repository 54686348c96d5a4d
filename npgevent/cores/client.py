"""Client cores: run-mode detection and the single-end / dual-end choice.

Mode 0 (auto) tries to listen on the tunnel address: success means single-end
forwarding (the listener is handed over, so nothing races for the port);
failure (a remote address, or the port is taken) means dual-end tunnel mode.
Mode 1 forces single-end, mode 2 dual-end.
"""

from __future__ import annotations

from ..errors import CoreError
from ..net.sockopt import ListenError, listen_tcp
from .common import Core, Instance
from .forward import ForwardCore


def client_core(inst: Instance) -> Core:
    mode = inst.opts.mode
    if mode == "1":
        return ForwardCore(inst)
    if mode == "0":
        try:
            sock = listen_tcp(inst.spec.tunnel, _tunnel_ip(inst))
        except (ListenError, OSError) as exc:
            inst.log.debug("Single-end listen failed (%s): using dual-end mode", exc)
            return dual_end_core(inst)
        return ForwardCore(inst, tcp_listener=sock)
    return dual_end_core(inst)


def _tunnel_ip(inst: Instance) -> str | None:
    host = inst.spec.tunnel
    if host.host == "" or host.is_ip or host.host.lower() == "localhost":
        return None
    return inst.resolver.resolve(host.host)[0]


def dual_end_core(inst: Instance) -> Core:
    raise CoreError("dual-end client mode is not available yet")
