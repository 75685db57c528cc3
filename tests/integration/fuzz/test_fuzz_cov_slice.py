"""A seeded slice of bench/fuzz_cov.py in CI: coverage-guided fuzzing (atheris/libFuzzer).

Each target (QMP monitor and commands, NBD server, qcow2 driver) runs in-process under
libFuzzer for a few thousand inputs from a fixed seed. A slice fails on any finding (an
exception, a malformed or "internal error" QMP reply, an NBD server that does not close,
a qcow2 image that makes the driver raise something other than a clean refusal, an error
blockd logs), and also when the fuzzer found no new coverage beyond its seed corpus: that
would mean the instrumentation or the harness is broken, not that blockd is well tested.
The full runs (100,000 inputs per target) and their numbers are in bench/README.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import missing, require_module, require_tool

FUZZ = Path(__file__).resolve().parents[3] / "bench" / "fuzz_cov.py"
#: Inputs the full runs found, one directory per target: each must now pass.
REPRODUCERS = Path(__file__).resolve().parent / "reproducers"
RUNS = {"qmp": 1500, "nbd": 3000, "qcow2": 2000}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_cov_slice(target, tmp_path):
    require_module("atheris", "atheris (requirements-test.txt)")
    if target == "qcow2":
        require_tool("qemu-img", "qemu-utils")
    if os.geteuid() != 0:
        missing("root: bench/fuzz_cov.py mounts a tmpfs and chroots into it")
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(FUZZ), "--target", target, "--runs",
                           str(RUNS[target]), "--seed", "20261122", "--json", str(out)],
                          capture_output=True, text=True, timeout=280, check=False,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["targets"][target]
    assert res["findings"] == [], json.dumps(res["findings"], indent=1)[-6000:]
    assert proc.returncode == 0 and res["exit_code"] == 0, proc.stderr[-3000:]
    assert res["runs"] == RUNS[target], res
    start, end = res["after_seeds"], res["at_end"]
    assert end["ft"] > start["ft"] and end["corpus"] > start["corpus"], res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", sorted(p.name for p in REPRODUCERS.iterdir()))
def test_fuzz_cov_reproducers(target):
    """Every finding of a full run, replayed through the same harness (no libFuzzer)."""
    require_module("atheris", "atheris (requirements-test.txt)")
    if os.geteuid() != 0:
        missing("root: bench/fuzz_cov.py mounts a tmpfs and chroots into it")
    files = sorted(str(p) for p in (REPRODUCERS / target).iterdir())
    assert files
    proc = subprocess.run([sys.executable, str(FUZZ), "--target", target, "--replay", *files],
                          capture_output=True, text=True, timeout=240, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"replayed": len(files), "findings": 0}
