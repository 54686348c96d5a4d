"""Entry point: ``npgevent`` / ``python -m npgevent``.

The only place that monkey-patches: the daemon is a gevent program, and
patching makes the few stdlib users (logging locks, dnspython's socket module,
subprocess in master mode) cooperative.  Importing :mod:`npgevent` elsewhere
never patches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def configure_gevent(environ: Mapping[str, str]) -> None:
    """gevent settings of the daemon, before anything spawns; the environment wins."""
    import gevent

    if "GEVENT_TRACK_GREENLET_TREE" not in environ:
        # each greenlet would record who spawned it and walk that greenlet's stack: work per
        # session greenlet (several per connection) that nothing here reads
        gevent.config.track_greenlet_tree = False


def patch_gevent() -> None:
    """``monkey.patch_all()`` without gevent's look-up of plugins.

    ``patch_all`` announces three events, and for each one gevent reads the entry points of
    every installed distribution to find plugins that subscribe to it: ~300 ms of start-up
    and up to ~1.5 MB of RSS with 124 packages installed (bench/README.md), for the one plugin
    gevent itself registers (a warning about patching ``signal`` without ``os``, which this
    never does).  The events still reach subscribers registered in the process; only
    plugins found through entry points are not looked for.

    The ``ssl`` module is left as it is: patching it imports it, and with it the system's
    libssl, ~4 MB of RSS in a single-end forwarder (bench/README.md), and no daemon uses it
    through the standard library: TLS pool connections are pyOpenSSL over gevent sockets,
    QUIC does its own TLS in its thread, and the master's HTTPS is served through
    ``gevent.ssl``'s own classes, which need no patching."""
    from gevent import events, monkey

    scan = getattr(events, "notify_and_call_entry_points", None)
    notify = getattr(events, "notify", None)
    if scan is None or notify is None:  # another gevent: its own way
        monkey.patch_all(ssl=False)
        return
    events.notify_and_call_entry_points = notify
    try:
        monkey.patch_all(ssl=False)
    finally:
        events.notify_and_call_entry_points = scan


def main() -> None:
    configure_gevent(os.environ)
    patch_gevent()
    from npgevent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
