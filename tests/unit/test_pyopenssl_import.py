"""pyOpenSSL is imported without asyncio (npgevent.net.pyopenssl), and nothing else changes:
its deprecated functions still warn, with their messages, and typing_extensions' decorator is
the library's own again afterwards.  Each case runs in a fresh interpreter, as a daemon's
import does (the test process may hold asyncio already, through pytest's plugins)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = r"""
import json, sys, warnings
from gevent import monkey
monkey.patch_all(ssl=False)
from npgevent.net import tlsctx, tls  # every module that uses pyOpenSSL
import typing_extensions
from OpenSSL import SSL, crypto
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        crypto.get_elliptic_curves()
    except Exception:
        pass
print(json.dumps({
    "loaded": sorted(n for n in ("asyncio", "ssl", "_ssl", "asyncio.coroutines") if n in sys.modules),
    "restored": typing_extensions.deprecated.__module__ == "typing_extensions",
    "warned": [(w.category.__name__, str(w.message), w.filename) for w in caught],
    "marked": SSL.Context.set_passwd_cb.__deprecated__,
    "context": SSL.Context(SSL.TLS_METHOD) is not None,
}))
"""


def probe(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="pyOpenSSL uses warnings.deprecated")
def test_pyopenssl_loads_without_asyncio_or_ssl() -> None:
    got = probe(PROBE)
    assert got["loaded"] == []
    assert got["context"]


def test_deprecated_functions_still_warn_and_the_decorator_is_restored() -> None:
    got = probe(PROBE)
    assert got["restored"]
    assert got["warned"] == [[
        "DeprecationWarning",
        "get_elliptic_curves is deprecated. You should use the APIs in cryptography instead.",
        "<string>",  # the caller's line, as the original decorator's stack level gives
    ]]
    assert got["marked"].startswith("Context.set_passwd_cb is deprecated")


def test_a_process_with_asyncio_imports_pyopenssl_as_it_is() -> None:
    got = probe("import asyncio\n" + PROBE)
    assert "asyncio" in got["loaded"]
    assert got["restored"] and got["warned"][0][0] == "DeprecationWarning"
