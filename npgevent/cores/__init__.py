"""The runnable cores: single-end forwarder, tunnel server and client, and their runner."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..log import InstanceLog
from ..settings import Options
from ..url import TunnelSpec
from .common import Core, Instance, Runner


def build_runner(spec: TunnelSpec, opts: Options, log: InstanceLog) -> Any:
    """The runner for a parsed URL: a :class:`Runner` for tunnels, the Master for master://."""
    if spec.scheme == "master":
        from ..master.core import Master

        return Master(spec, opts, log)
    inst = Instance(spec, opts, log)
    if spec.scheme == "client":
        return Runner(inst, client_core)
    if spec.scheme == "server":
        from .server import ServerCore

        return Runner(inst, ServerCore)
    raise ConfigError("%s:// is not supported yet" % spec.scheme)


def client_core(inst: Instance) -> Core:
    """The client's run mode: 1 single-end, 2 dual-end, 0 auto: single-end when the tunnel
    address can be listened on here (the listener is handed over, so nothing races for the
    port), dual-end when it can't (a remote address, or the port is taken).  The tunnel
    machinery is imported only for dual-end (single-end forwarding stays ~2 MB smaller)."""
    from ..net.sockopt import ListenError, listen_tcp
    from .forward import ForwardCore

    mode = inst.opts.mode
    if mode == "1":
        return ForwardCore(inst)
    if mode == "0":
        try:
            sock = listen_tcp(inst.spec.tunnel, inst.resolver.listen_ip(inst.spec.tunnel.host))
        except (ListenError, OSError) as exc:
            inst.log.debug("Single-end listen failed (%s): using dual-end mode", exc)
        else:
            return ForwardCore(inst, tcp_listener=sock)
    from .client import DualClientCore

    return DualClientCore(inst)
