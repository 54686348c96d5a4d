"""The real Go NodePass v1.11.0 as a test peer (``NPG_GO_NODEPASS`` names the binary).

Build it once per machine as ``../shared/tools/README.md`` explains.  Tests that
need it are marked :data:`requires_go` and are skipped, with the reason shown in
pytest's summary, where the variable is unset or does not name an executable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import NpProcess

GO_BIN = os.environ.get("NPG_GO_NODEPASS", "")
HAVE_GO = bool(GO_BIN) and os.path.isfile(GO_BIN) and os.access(GO_BIN, os.X_OK)
SKIP_REASON = ("NPG_GO_NODEPASS is not set" if not GO_BIN else
               "NPG_GO_NODEPASS=%s is not an executable file" % GO_BIN) + \
              ": real Go NodePass interop tests skipped (build it: ../shared/tools/README.md)"

requires_go = pytest.mark.skipif(not HAVE_GO, reason=SKIP_REASON)


class GoProcess(NpProcess):
    """``nodepass URL``: the same line collection, waits and signals as an npgevent process."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=env, program=[GO_BIN])


class GoMaster(GoProcess):
    """A Go master from a private copy of the binary: Go keeps its state next to the executable
    (``<dir>/gob/nodepass.gob``), so each master gets a directory of its own."""

    def __init__(self, directory: Path, query: str = "log=info", prefix: str = "/api",
                 env: dict[str, str] | None = None) -> None:
        from helpers import free_port

        directory.mkdir(parents=True, exist_ok=True)
        binary = directory / "nodepass"
        shutil.copy2(GO_BIN, binary)
        self.port = free_port()
        NpProcess.__init__(self, "master://127.0.0.1:%d%s?%s" % (self.port, prefix, query),
                           env=env, program=[str(binary)])
        self.key = self.wait_for(r"API Key (?:created|loaded): ([0-9a-f]{32})").group(1)
        self.wait_for(r"Master started: ")
        self.base = prefix.rstrip("/") + "/v1"

    def api(self, method: str, path: str, body: Any = None, key: Any = "default", **kw: Any) -> Any:
        from helpers import http

        return http(method, self.port, self.base + path, body, self.key if key == "default" else key, **kw)
