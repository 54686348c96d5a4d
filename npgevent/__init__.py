"""npgevent: a NodePass v1.11.0-compatible TCP/UDP tunnel on gevent.

Importing the package never monkey-patches anything; only the entry point
(:mod:`npgevent.__main__`) calls ``gevent.monkey.patch_all()``.  Library code
uses gevent's APIs explicitly so it runs the same patched or not.
"""

__version__ = "0.1.0"

#: The NodePass release whose wire protocol and behaviour npgevent follows.
NODEPASS_VERSION = "v1.11.0"
