"""Load: 16 exports and 4 fleecing jobs on one engine, readers and writers at once.

The run is bounded (LOAD_SECONDS, 20 s by default; bench/load.py runs it for minutes).
Nothing here asserts on speed: the test fails on an I/O error, a fleecing export that is
not its point in time, a client that made no progress at all, or RSS that keeps growing.
"""

import json
import os

import pytest

from helpers import require_module
from helpers.load import LoadRun

SECONDS = float(os.environ.get("LOAD_SECONDS", "20"))


@pytest.mark.timeout(600)
def test_sixteen_exports_four_fleecing_jobs(daemon, engine, tmp_path):
    require_module("nbd", "python3-libnbd")
    d = daemon(engine, nbd=True)
    run = LoadRun(d, tmp_path)
    run.start()
    assert len(d.qmp.cmd("query-block-exports")) == 16
    run.run(SECONDS)
    problems = run.finish()
    report = run.report()
    print(json.dumps({k: v for k, v in report.items() if k != "rss_kib"}))
    print("engine RSS KiB (t, rss):", report["rss_kib"])
    assert problems == []
    assert all(n > 0 for n in report["ops"].values()), report["ops"]
    # no leak: the RSS of the last third of the run stays near the first third's peak
    # (buffers and threads settle in the first seconds; a leak of a few KiB per request
    # grows by tens of MiB over the run)
    rss = [r for _, r in report["rss_kib"]]
    third = max(1, len(rss) // 3)
    growth = max(rss[-third:]) - max(rss[:third])
    assert growth < 48 * 1024, f"RSS grew by {growth} KiB: {report['rss_kib']}"
