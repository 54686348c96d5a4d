"""The master's /docs page rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from helpers import ROOT, MasterProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARTIFACTS = ROOT / "test-artifacts"
OPERATIONS = {("GET", "/instances"), ("POST", "/instances"), ("GET", "/instances/{id}"),
              ("PATCH", "/instances/{id}"), ("PUT", "/instances/{id}"), ("DELETE", "/instances/{id}"),
              ("GET", "/events"), ("GET", "/info"), ("POST", "/info"), ("GET", "/tcping"),
              ("GET", "/openapi.json"), ("GET", "/docs")}


def _chromium(tmp_path, *args):
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--user-data-dir=%s" % (tmp_path / "profile"), "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(240)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_docs_page_renders_every_operation_offline(tmp_path):
    with MasterProcess(tmp_path / "state", prefix="/admin") as m:
        url = "http://127.0.0.1:%d/admin/v1/docs" % m.port
        dom = _chromium(tmp_path, "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'class="swagger-ui"' in html  # Swagger UI ran (from the packaged copy: no network here)
        found = set(re.findall(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', html))
        assert found == OPERATIONS, sorted(found ^ OPERATIONS)
        assert "NodePass master API (npgevent)" in html
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "master-docs.png"
        res = _chromium(tmp_path, "--screenshot=%s" % shot, "--window-size=1280,2200",
                        "--hide-scrollbars", url)
        assert res.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
