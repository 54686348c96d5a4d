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


def main() -> None:
    from gevent import monkey

    configure_gevent(os.environ)
    monkey.patch_all()
    from npgevent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
