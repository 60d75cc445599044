"""scripts/test, the README's test command, when a tool the tests need is missing: it installs it, or
names the package and the command and stops before any slow step."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test"), "--collect-only", "-q", "tests/test_sampling.py"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **env}, cwd=tmp_path)
    return r, time.perf_counter() - t0


def test_missing_browser_is_named_with_its_install_command(tmp_path):
    stamp = ROOT / ".venv" / ".omni-installed"
    before = stamp.stat().st_mtime if stamp.exists() else None
    r, took = run_script(tmp_path, OMNI_CHROMIUM=str(tmp_path / "no-chromium"), OMNI_SETUP_NO_INSTALL="1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "chromium" in lines[0] and "apt-get install -y chromium" in lines[0], r.stderr
    assert took < 10 and (stamp.stat().st_mtime if stamp.exists() else None) == before  # nothing installed


def test_missing_browser_is_installed_when_it_can_be(tmp_path):
    """As root with apt-get (here a stand-in on PATH that records its calls and 'installs' the browser)."""
    browser = tmp_path / "chromium"
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "apt.log"
    (fake / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                                  f"case \"$*\" in *install*) printf '#!/bin/sh\\n' > {browser}; chmod +x {browser};; esac\n")
    (fake / "apt-get").chmod(0o755)
    r, _ = run_script(tmp_path, OMNI_CHROMIUM=str(browser), PATH=f"{fake}:{os.environ['PATH']}")
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update") and "install" in calls[1] and "chromium" in calls[1]
    assert r.returncode == 0, r.stderr  # then it went on: venv, install (already done), pytest
    assert "test_sampling.py" in r.stdout
