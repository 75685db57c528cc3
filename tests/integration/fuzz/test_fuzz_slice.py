"""A seeded slice of bench/fuzz.py in CI: QMP sessions, hostile NBD clients, damaged qcow2.

The full runs (100,000 cases per target) and their numbers are in bench/README.md.  A
slice fails on any finding: a malformed or missing QMP reply, an NBD server that hangs or
dies or breaks a good client, a changed read-only export, a qcow2 image that makes the
driver raise something other than a clean refusal.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_module

FUZZ = Path(__file__).resolve().parents[3] / "bench" / "fuzz.py"
CASES = {"qmp": 3000, "nbd": 3000, "qcow2": 600}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", sorted(CASES))
def test_fuzz_slice(target, tmp_path):
    if target == "nbd":
        require_module("nbd", "python3-libnbd")
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(FUZZ), "--target", target, "--cases",
                           str(CASES[target]), "--seed", "20261122", "--json", str(out)],
                          capture_output=True, text=True, timeout=540, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["findings"] == [], json.dumps(result["findings"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["targets"][target]["cases"] == CASES[target]
    if target == "qcow2":       # the damage reached every layer of the driver
        t = result["targets"]["qcow2"]
        assert t["open_refused"] and t["io_ok"], t
