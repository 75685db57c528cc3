"""Smoke tests of the repository's scripts on qemu-storage-daemon.

They check that scripts/demo and the benchmarks in bench/ work end to end, on qsd
and blockd; they assert on correctness only, never on timing.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import require_tool
from helpers.daemon import REPO



@pytest.fixture(autouse=True)
def _tools():
    for tool in ("qemu-storage-daemon", "qemu-io", "qemu-img", "nbdcopy", "nbdinfo"):
        require_tool(tool)


@pytest.mark.parametrize("demo_engine", ["qsd", "blockd"])
def test_demo(demo_engine):
    """The README's main job: a point-in-time backup of a disk being written to."""
    env = {**os.environ, "DEMO_ENGINE": demo_engine, "DEMO_SKIP_BOOTSTRAP": "1",
           "DEMO_PYTHON": sys.executable, "DEMO_SIZE_MIB": "64"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DEMO OK"
    assert any(line.strip().startswith(f"engine       {demo_engine}") for line in lines), proc.stdout
    assert any("one point in time" in line for line in lines), proc.stdout
    assert any("only file0 and src0 remain" in line for line in lines), proc.stdout


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "nbd_throughput.py"),
                           "--engines", "qsd", "--size-mib", "16", "--runs", "1",
                           "--rounds", "1", "--dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    qsd = result["engines"]["qsd"]
    assert "error" not in qsd
    assert qsd["write_verified"] is True
    assert qsd["exit_code"] == 0
    assert set(qsd) >= {"read_mibs", "write_mibs", "read_runs", "write_runs"}
    assert "seq read" in proc.stdout and "seq write" in proc.stdout


def run_bench(script, tmp_path, *args):
    """Run bench/SCRIPT on both engines (small, one run) in a short work directory
    (the sockets' paths must fit in sun_path); return the process and its JSON."""
    out = tmp_path / "bench.json"
    work = tempfile.mkdtemp(prefix="bench-")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / script),
                               "--engines", "qsd,blockd", "--runs", "1", *args,
                               "--dir", work, "--json", str(out)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_qcow2_bench_runs_and_writes_json(tmp_path):
    proc, result = run_bench("qcow2_throughput.py", tmp_path, "--size-mib", "8")
    for engine in ("qsd", "blockd"):
        eng = result["engines"][engine]
        assert "errors" not in eng, eng
        assert set(eng) >= {"full_read_mibs", "full_write_mibs", "half_read_mibs",
                            "half_write_mibs"}
    assert set(result["ratio_blockd_qsd"]) == {"full_read", "full_write", "half_read",
                                               "half_write"}
    assert "half  write" in proc.stdout


@pytest.mark.parametrize("mode", ["backup", "cbw"])
def test_fleecing_bench_runs_and_writes_json(tmp_path, mode):
    proc, result = run_bench("fleecing_throughput.py", tmp_path, "--size-mib", "8",
                             "--mode", mode)
    for engine in ("qsd", "blockd"):
        r = result["engines"][engine]
        assert "error" not in r, r
        assert r["fleece_verified"] is True
        assert r["exit_code"] == 0
        assert set(r) >= {"plain_mibs", "cow_mibs", "fleece_mibs", "cow_ratio"}
    assert set(result["ratio_blockd_qsd"]) >= {"plain", "cow", "fleece", "cow_ratio"}
    assert "CoW ratio" in proc.stdout


def test_copy_bench_runs_and_writes_json(tmp_path):
    proc, result = run_bench("copy_throughput.py", tmp_path, "--size-mib", "16")
    for engine in ("qsd", "blockd"):
        r = result["engines"][engine]
        assert "error" not in r, r
        for metric in ("qemu_img", "copy_qcow2", "copy_raw", "nbdcopy"):
            assert r[f"{metric}_verified"] is True, metric
        assert r["incremental_verified"] is True
        assert 0 < r["incremental_seconds"] and 0 < r["incremental_ratio"]
        assert r["tib_copy_qcow2_seconds"] > 0
    assert "incremental / full" in proc.stdout
