"""kill -9 at random moments: qemu-img check may find leaks, never corruption;
flushed data is there; reopening a dirty image repairs the leaks."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from blockd.drivers.qcow2 import create_qcow2
from qcow2_crash_child import operations
from qcow2_qemu import LONG, MiB, check, to_raw
from qcow2_testlib import aligned_part, open_qcow2

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 24 * MiB
#: kills per seed; 6 seeds x 9 = 54 kills in the default run (acceptance: at least 50)
ROUNDS = 10 if LONG else 9


def replay(seed, baseline, log, cluster_size, discard_zeroes):
    """Expected content after a crash: (content, known) where ``known``
    marks bytes whose value is certain (written before the last flush and
    untouched by the operations that were in flight or unflushed)."""
    starts = [int(line.split()[1]) for line in log if line.startswith("S ")]
    flushes = [int(line.split()[1]) for line in log if line.startswith("F ")]
    last_started = starts[-1] if starts else -1
    last_flush = flushes[-1] if flushes else -1
    content = bytearray(baseline)
    known = bytearray(b"\x01" * len(baseline))
    for i, (kind, off, n, data) in enumerate(operations(seed, len(baseline))):
        if i > last_started:
            break
        if i > last_flush:
            known[off:off + n] = bytes(n)
            continue
        if kind == "write":
            content[off:off + n] = data
        elif kind in ("zero", "unmap"):
            content[off:off + n] = bytes(n)
        elif kind == "discard" and discard_zeroes:
            start, end = aligned_part(off, n, cluster_size, len(baseline))
            if start < end:
                content[start:end] = bytes(end - start)
    return bytes(content), bytes(known)


@pytest.mark.parametrize("seed", range(12 if LONG else 6))
def test_kill_9(graph, tmp_path, seed):
    rnd = random.Random(seed)
    cluster_size = rnd.choice([512, 4096, 65536])
    version = 3 if seed % 3 else 2
    path = tmp_path / "crash.qcow2"
    create_qcow2(str(path), SIZE, cluster_size=cluster_size, version=version)
    baseline = bytes(SIZE)
    for rnd_round in range(ROUNDS):
        child_seed = seed * 100 + rnd_round
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "qcow2_crash_child.py"),
                                 str(path), str(child_seed)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(rnd.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        res = check(path)
        assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0, res
        actual = to_raw(path)
        expect, known = replay(child_seed, baseline, out.splitlines(), cluster_size, True)
        bad = [i for i in range(0, SIZE, 512)
               if known[i] and actual[i:i + 512] != expect[i:i + 512]
               and all(known[i:i + 512])]
        assert not bad, "flushed data lost at %d sectors, first %#x" % (len(bad), bad[0])
        baseline = actual
    # A read/write open repairs the leaks of a dirty (v3) image.
    node = open_qcow2(graph, path)
    assert node.pread(0, SIZE) == baseline
    graph.close_all()
    res = check(path)
    assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0, res
    if version == 3:
        assert res.get("leaks", 0) == 0, res
    assert to_raw(path) == baseline
