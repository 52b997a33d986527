"""The server's soak in its short form: schemathesis over the OpenAPI schema (no 5xx, no hang), then mixed
traffic with cancels, bad requests and KV preemption (no unexpected outcome, no leak); see scripts/soak_server.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_soak(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_server.py"), "--duration", "15", "--examples", "20",
                        "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(report["checks"].values()), report["checks"]
    assert report["schemathesis"]["responses"] >= 100
    mix = report["mix"]
    assert mix["requests"] >= 50 and {"bad", "cancel", "long", "stream"} <= set(mix["by_kind"])
