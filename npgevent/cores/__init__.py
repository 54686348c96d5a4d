"""The runnable cores: single-end forwarder, tunnel server and client, and their runner."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..log import InstanceLog
from ..settings import Options
from ..url import TunnelSpec
from .common import Instance, Runner


def build_runner(spec: TunnelSpec, opts: Options, log: InstanceLog) -> Any:
    """The runner for a parsed URL: a :class:`Runner` for tunnels, the Master for master://."""
    if spec.scheme == "master":
        from ..master.core import Master

        return Master(spec, opts, log)
    inst = Instance(spec, opts, log)
    if spec.scheme == "client":
        from .client import client_core

        return Runner(inst, client_core)
    if spec.scheme == "server":
        from .server import ServerCore

        return Runner(inst, ServerCore)
    raise ConfigError("%s:// is not supported yet" % spec.scheme)
