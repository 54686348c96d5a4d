"""The runnable cores: single-end forwarder, tunnel server and client, and their runner."""

from __future__ import annotations

from ..errors import ConfigError
from ..log import InstanceLog
from ..settings import Options
from ..url import TunnelSpec
from .common import Instance, Runner


def build_runner(spec: TunnelSpec, opts: Options, log: InstanceLog) -> Runner:
    """The runner for a parsed server:// or client:// URL."""
    inst = Instance(spec, opts, log)
    if spec.scheme == "client":
        from .client import client_core

        return Runner(inst, client_core)
    if spec.scheme == "server":
        from .server import ServerCore

        return Runner(inst, ServerCore)
    raise ConfigError("%s:// is not supported yet" % spec.scheme)
