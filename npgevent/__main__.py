"""Entry point: ``npgevent`` / ``python -m npgevent``.

The only place that monkey-patches: the daemon is a gevent program, and
patching makes the few stdlib users (logging locks, dnspython's socket module,
subprocess in master mode) cooperative.  Importing :mod:`npgevent` elsewhere
never patches.
"""

from __future__ import annotations

import sys


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    from npgevent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
