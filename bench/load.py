#!/usr/bin/env python3
"""Load on one engine: 16 NBD exports, 4 fleecing jobs, 16 concurrent clients, for minutes.

    .venv/bin/python bench/load.py [--seconds 300] [--engines blockd,qsd] [--json PATH]

The same run as tests/integration/load/test_load.py (tests/helpers/load.py), longer, on
each engine in turn: prints per-engine requests, MiB moved, the fairness between clients
of one kind (min/max requests), the engine's RSS at the start, peak and end and its slope
over the second half of the run, and whether every fleecing export still was its point in
time.  Needs python3-libnbd (run it with the project's .venv).  Not a test: nothing fails
on speed; the exit code is 1 only if a run found a problem.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "plugins" / "module_utils")]

from helpers import DaemonFactory  # noqa: E402  pylint: disable=wrong-import-position
from helpers.load import LoadRun  # noqa: E402  pylint: disable=wrong-import-position


def slope_kib_per_min(samples):
    """Least-squares slope of (t, rss) over the second half of the run, KiB per minute."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return 0.0
    n = len(half)
    mt = sum(t for t, _ in half) / n
    mr = sum(r for _, r in half) / n
    var = sum((t - mt) ** 2 for t, _ in half)
    return 60 * sum((t - mt) * (r - mr) for t, r in half) / var if var else 0.0


def one(engine, seconds, disk_mib):
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir="/dev/shm") as tmp:
        factory = DaemonFactory(Path(tmp))
        try:
            d = factory(engine, nbd=True)
            run = LoadRun(d, Path(tmp), disk_mib=disk_mib)
            run.start()
            run.run(seconds)
            problems = run.finish()
            rep = run.report()
        finally:
            factory.finish()
    rss = [r for _, r in rep["rss_kib"]]
    return {"engine": engine, "seconds": seconds, "problems": problems,
            "requests": sum(rep["ops"].values()), "mib": rep["mib"],
            "mib_per_s": round(rep["mib"] / seconds, 1),
            "fairness_min_over_max": rep["fairness_min_over_max"],
            "rss_mib": {"start": round(rss[0] / 1024, 1), "peak": round(max(rss) / 1024, 1),
                        "end": round(rss[-1] / 1024, 1)},
            "rss_slope_kib_per_min_second_half": round(slope_kib_per_min(rep["rss_kib"]), 1),
            "ops": rep["ops"], "rss_kib": rep["rss_kib"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--engines", default="blockd,qsd")
    ap.add_argument("--disk-mib", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    results = [one(e, a.seconds, a.disk_mib) for e in a.engines.split(",")]
    print("| engine | requests | MiB/s | fairness writers/fleece readers/readers | "
          "RSS MiB start/peak/end | RSS slope KiB/min (2nd half) | problems |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f = r["fairness_min_over_max"]
        print(f"| {r['engine']} | {r['requests']} | {r['mib_per_s']} | "
              f"{f.get('writer')}/{f.get('fleece-reader')}/{f.get('reader')} | "
              f"{r['rss_mib']['start']}/{r['rss_mib']['peak']}/{r['rss_mib']['end']} | "
              f"{r['rss_slope_kib_per_min_second_half']} | {len(r['problems'])} |")
        for p in r["problems"]:
            print("  problem:", p)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
