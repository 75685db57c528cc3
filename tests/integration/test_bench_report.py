"""bench/report.py runs end to end on tiny sizes: the JSON's shape and a real PNG, no speed check."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_module

REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"


@pytest.mark.timeout(400)
def test_report_quick(tmp_path):
    require_module("nbd", "python3-libnbd")
    require_module("matplotlib", "matplotlib (requirements-dev.txt)")
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, str(REPORT), "--quick", "--size-mib", "8",
                           "--out", str(out), "--markdown", str(tmp_path / "t.md")],
                          capture_output=True, text=True, timeout=360, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [(f["bench"], f["figure"]) for f in report["figures"]]
    assert len(names) == len(set(names)) >= 14, names
    assert {b for b, _ in names} >= {"nbd", "qcow2", "fleecing (backup)", "fleecing (cbw)",
                                     "copy", "load", "qmp"}
    assert ("copy", "pull to qcow2, zero-filled disk") in names
    assert {f["peer"] for f in report["figures"]} == {"qemu-storage-daemon", "qemu-img convert",
                                                      "nbdcopy"}
    for f in report["figures"]:
        assert f["blockd"] > 0 and f["peer_value"] > 0 and f["ratio"] > 0, f
        want = f["blockd"] / f["peer_value"] if f["higher_is_better"] \
            else f["peer_value"] / f["blockd"]
        assert abs(f["ratio"] - want) < 0.01, f
        assert f["source"] is None if f["bench"] == "qmp" else (out / f["source"]).is_file(), f
    assert all(b["exit_code"] == 0 for b in report["benches"]), report["benches"]
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 300, (width, height)
    table = (tmp_path / "t.md").read_text()
    assert table.count("\n") == len(names) + 2 and "| qmp |" in table
