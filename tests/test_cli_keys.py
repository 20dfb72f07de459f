"""``ldd`` against a server that wants keys: a 401 says which variable to set, and the key in LDD_API_KEY works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.api_server import serve_api

ROOT = Path(__file__).resolve().parents[1]


def _ldd(url: str, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDD_")}
    env.update({"PYTHONPATH": str(ROOT), "LDD_URL": url})
    if key is not None:
        env["LDD_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_401_names_the_variable_and_the_key_works(tmp_path: Path) -> None:
    srv = serve_api(tmp_path, LDD_API_KEYS="team-a:sekrit")
    try:
        missing = _ldd(srv.url, None, "models", "list")
        assert missing.returncode != 0 and "401" in missing.stderr and "set LDD_API_KEY" in missing.stderr
        wrong = _ldd(srv.url, "nope", "models", "list")
        assert wrong.returncode != 0 and "not one the server knows" in wrong.stderr
        ok = _ldd(srv.url, "sekrit", "models", "list")
        assert ok.returncode == 0, ok.stderr
        assert "LDD_API_KEY" in _ldd(srv.url, None, "--help").stdout
    finally:
        srv.stop()
