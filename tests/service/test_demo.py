"""`make demo` (python -m app.demo --start-server): the whole story over HTTP against a service it starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from app.core.backbones import proxy_available
from tests.service.conftest import REPO

TINY_JOB = {"phase1": {"epochs": 1}, "phase2": {"epochs": 1}, "pseudo_labels": {"top_k": 2}}


@pytest.mark.timeout(240)
@pytest.mark.skipif(not proxy_available(), reason="the proxy model's weights are not installed")
def test_demo_runs_the_story_against_a_service_it_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "COFT_DATA_DIR")}
    env.update(PYTHONPATH=str(REPO), COFT_DEVICE="cpu", COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "app.demo", "--start-server", "--num-train", "60",
                             "--num-test", "30", "--config", json.dumps(TINY_JOB)],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"zero-shot \d+\.\d%\s+->\s+CoFT \d+\.\d%", output), output
    assert '"hflip": false' in output  # digits: no mirroring, merged with the overrides
    assert "service stopped (exit code 0)" in output
