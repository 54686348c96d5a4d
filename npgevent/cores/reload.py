"""SIGHUP: apply re-read settings to a running instance.

:func:`plan` compares the running URL and options with the re-read ones (pure:
no I/O) and sorts every difference into one of three kinds:

* **live**: applied at once, no session dropped: ``log``, ``rate`` (sessions in
  flight follow the new rate when one was set before), ``slot``, ``read`` (new
  sessions), the target list (except the address a core listens on), ``dns``,
  ``dial``, ``proxy``, ``NP_SERVICE_COOLDOWN`` and ``NP_SHUTDOWN_TIMEOUT``;
* **restart**: the core restarts with the cooldown, and live sessions carry on
  (as after any restart): the tunnel address, the key, ``tls``, ``crt``/``key``
  paths, ``mode``, ``quic``, ``auth``, pool sizes, ``notcp``/``noudp``, the
  listening target and every other tunable;
* **process**: only a new process can change them (kept, with a WARN): the
  scheme, ``log-format``, ``workers`` and ``metrics``.

The ``crt``/``key`` files themselves are re-read on every SIGHUP (``tls=2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import CoreError
from ..log import LEVELS
from ..settings import Options
from ..url import TunnelSpec

LIVE = ("log", "rate", "slot", "read", "dns", "dial", "proxy", "service_cooldown", "shutdown_timeout")
PROCESS = ("log_format", "workers", "metrics")


class Reloading(CoreError):
    """Raised into a core whose new settings need a restart (not an error)."""


@dataclass
class Plan:
    live: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    process: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.live or self.restart or self.process)


def plan(old_spec: TunnelSpec, old: Options, new_spec: TunnelSpec, new: Options,
         listens_on_target: bool) -> Plan:
    """Sort the differences (see module docstring).  *listens_on_target*: the core listens
    on the first target (a tunnel's receiving side), so changing it needs a restart."""
    p = Plan()
    if new_spec.scheme != old_spec.scheme:
        p.process.append("scheme")
        return p
    if (new_spec.tunnel, new_spec.key) != (old_spec.tunnel, old_spec.key):
        p.restart.append("tunnel address or key")
    if new_spec.targets != old_spec.targets:
        if listens_on_target and new_spec.targets[:1] != old_spec.targets[:1]:
            p.restart.append("listening target")
        else:
            p.live.append("targets")
    for f in fields(Options):
        if getattr(new, f.name) == getattr(old, f.name):
            continue
        kind = p.live if f.name in LIVE else p.process if f.name in PROCESS else p.restart
        kind.append(f.name)
    return p


def keep_process_only(old: Options, new: Options) -> Options:
    """*new* with the settings only a new process can change set back to *old*'s."""
    return new.with_(**{name: getattr(old, name) for name in PROCESS})


def apply_live(runner: Any, spec: TunnelSpec, opts: Options, share: int = 1, rate_share: int = 1) -> None:
    """Put *spec*/*opts* in place on *runner*'s instance and running core without a restart.
    *share*, *rate_share*: the number of worker processes the instance's slot and rate are
    split over (workers share one rate bucket: 1)."""
    from ..relay.limit import MBIT

    inst = runner.inst
    inst.spec, inst.opts = spec, opts
    inst.log.level = LEVELS.get(opts.log, inst.log.level)
    inst.slots.limit = math.ceil(opts.slot / share)
    rate = opts.rate * MBIT / rate_share
    if rate <= 0:
        inst.limiter = None  # new sessions unlimited; those in flight keep their bucket
    elif inst.limiter is not None:
        inst.limiter.set_rate(rate)  # sessions in flight share the same bucket
    else:
        inst.limiter = inst.new_limiter(rate)
    inst.resolver.set_servers(opts.dns)
    core = runner.core
    if core is None:
        return
    core.opts = opts
    listeners = getattr(core, "listeners", None)
    if listeners is not None:
        listeners.opts = opts
    dialer = getattr(core, "dialer", None)
    if dialer is not None:
        dialer.targets = spec.targets
        dialer.source_ip = None if opts.dial == "auto" else opts.dial
