#!/usr/bin/env python3
"""One command for the performance report: every bench, blockd beside its peer, a table and a plot.

    .venv/bin/python bench/report.py [--quick] [--size-mib N] [--out DIR] [--markdown PATH]

Runs, each as a subprocess writing its own JSON into DIR (default bench/results/<date>):
nbd_throughput, qcow2_throughput, fleecing_throughput (backup and cbw modes),
copy_throughput and load (all against qemu-storage-daemon 7.2; the copy bench also against
qemu-img convert and nbdcopy as pullers), plus two QMP figures measured here (round trips
of ``query-named-block-nodes`` per second; ``blockdev-add`` + ``blockdev-del`` pairs per
second).  Then it writes DIR/report.json -- one entry per figure: bench, figure, unit,
blockd, peer, peer_value, ratio, higher_is_better, source (that bench's JSON in DIR; null for
the QMP figures) -- and DIR/report.png, a bar per figure of
blockd ÷ peer with a line at 1.0 (for figures where lower is better the ratio is peer ÷
blockd, so right of the line is always better for blockd).  ``--markdown PATH`` writes the
table that docs/performance.md shows.

``--quick``: 32 MiB images, one run each, 10 s of load (about a minute); the default: 1 GiB
images, best of 3 runs in each of 2 rounds, 60 s of load (7 minutes on a 2-core machine).
Needs the project's .venv (matplotlib, python3-libnbd) and the tools scripts/bootstrap
installs.
"""

import argparse
import datetime
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "plugins" / "module_utils")]


def run_bench(out, name, script, args, log):
    """Run bench SCRIPT with ARGS and --json; its JSON (or None, with the log kept)."""
    path = out / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.append({"bench": name, "cmd": cmd, "exit_code": proc.returncode,
                "seconds": round(time.monotonic() - t0, 1)})
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if not path.exists():
        print(f"report: {name} wrote no JSON (exit {proc.returncode}); see {name}.log",
              file=sys.stderr)
        return None
    return json.loads(path.read_text())


def fig(bench, figure, unit, blockd, peer, peer_value, higher=True):
    ratio = (blockd / peer_value if higher else peer_value / blockd) if blockd and peer_value else 0
    return {"bench": bench, "figure": figure, "unit": unit, "blockd": blockd, "peer": peer,
            "peer_value": peer_value, "ratio": round(ratio, 3), "higher_is_better": higher}


def engines_figures(bench, data, keys, unit="MiB/s"):
    """Figures blockd vs qsd from a bench JSON whose engines hold KEY_mibs values."""
    out = []
    for key, label in keys:
        b = data["engines"].get("blockd", {}).get(f"{key}_mibs")
        q = data["engines"].get("qsd", {}).get(f"{key}_mibs")
        if b is not None and q is not None:
            out.append(fig(bench, label, unit, b, "qemu-storage-daemon", q))
    return out


def qmp_figures(seconds):
    """QMP round trips and blockdev-add/del pairs per second, blockd and qsd."""
    from helpers import DaemonFactory  # pylint: disable=import-outside-toplevel
    rates = {}
    with tempfile.TemporaryDirectory(prefix="report-qmp-", dir="/dev/shm") as tmp:
        factory = DaemonFactory(Path(tmp))
        try:
            for engine in ("qsd", "blockd"):
                d = factory(engine)
                d.close_qmp()
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(d.dir / "qmp.sock"))
                f = s.makefile("rwb")
                f.readline()

                def call(msg):
                    f.write(json.dumps(msg).encode() + b"\n")
                    f.flush()
                    while True:
                        reply = json.loads(f.readline())
                        if "event" not in reply:
                            return reply
                call({"execute": "qmp_capabilities"})
                for what, msgs in (
                        ("query", [{"execute": "query-named-block-nodes",
                                    "arguments": {"flat": True}}]),
                        ("add_del", [{"execute": "blockdev-add", "arguments": {
                            "driver": "null-co", "node-name": "n0", "size": 1048576}},
                                     {"execute": "blockdev-del",
                                      "arguments": {"node-name": "n0"}}])):
                    n, t0 = 0, time.monotonic()
                    while time.monotonic() - t0 < seconds:
                        for m in msgs:
                            reply = call(m)
                            if "return" not in reply:
                                raise RuntimeError(f"{engine}: {m} -> {reply}")
                        n += 1
                    rates[(engine, what)] = n / (time.monotonic() - t0)
                s.close()
        finally:
            factory.finish()
    return [fig("qmp", "query-named-block-nodes round trips", "1/s",
                round(rates[("blockd", "query")]), "qemu-storage-daemon",
                round(rates[("qsd", "query")])),
            fig("qmp", "blockdev-add + blockdev-del pairs", "1/s",
                round(rates[("blockd", "add_del")]), "qemu-storage-daemon",
                round(rates[("qsd", "add_del")]))]


def need_matplotlib():
    """matplotlib, or exit with a message saying how to install it (checked before the benches)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
    except ImportError:
        sys.exit("report: matplotlib is missing: run `bash scripts/bootstrap` (it installs "
                 "requirements-dev.txt into .venv) or `.venv/bin/pip install matplotlib`")
    return matplotlib


def plot(figures, path, title):
    matplotlib = need_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    labels = [f"{f['bench']}: {f['figure']} (vs {f['peer']})" for f in figures]
    ratios = [f["ratio"] for f in figures]
    fig_, ax = plt.subplots(figsize=(11, 0.42 * len(figures) + 1.6))
    colors = ["#2a7" if r >= 1 else "#c54" for r in ratios]
    ax.barh(range(len(figures)), ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(figures)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for i, r in enumerate(ratios):
        ax.text(r + 0.01, i, f"{r:.2f}", va="center", fontsize=8)
    ax.set_xlabel("blockd ÷ peer (right of 1.0: blockd better)")
    ax.set_title(title, fontsize=10)
    fig_.tight_layout()
    fig_.savefig(path, dpi=100)


def markdown(figures):
    rows = ["| bench | figure | unit | blockd | peer | peer value | ratio |",
            "|---|---|---|---|---|---|---|"]
    for f in figures:
        lower = "" if f["higher_is_better"] else " (lower is better)"
        rows.append(f"| {f['bench']} | {f['figure']}{lower} | {f['unit']} | {f['blockd']} | "
                    f"{f['peer']} | {f['peer_value']} | **{f['ratio']:.2f}** |")
    return "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="32 MiB images, 1 run, 10 s of load, 1 s per QMP figure")
    ap.add_argument("--size-mib", type=int,
                    help="image size passed to every throughput bench (1024; 32 with --quick)")
    ap.add_argument("--out", type=Path, help="output directory (bench/results/<date>)")
    ap.add_argument("--markdown", type=Path, help="also write the markdown table here")
    a = ap.parse_args()
    need_matplotlib()
    size = a.size_mib or (32 if a.quick else 1024)
    runs = ["--runs", "1", "--rounds", "1"] if a.quick else ["--runs", "3", "--rounds", "2"]
    load_s = "10" if a.quick else "60"
    out = a.out or HERE / "results" / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--size-mib", str(size), *runs]
    log, figures = [], []
    t0 = time.monotonic()
    data = run_bench(out, "nbd", "nbd_throughput.py", common, log)
    if data:
        figures += engines_figures("nbd", data, [("read", "raw export seq read"),
                                                 ("write", "raw export seq write")])
    data = run_bench(out, "qcow2", "qcow2_throughput.py", common, log)
    if data:
        figures += engines_figures("qcow2", data, [
            ("full_read", "qcow2 read, allocated"), ("full_write", "qcow2 write, allocated"),
            ("half_read", "qcow2 read, half allocated"),
            ("half_write", "qcow2 write, allocating")])
    for mode in ("backup", "cbw"):
        data = run_bench(out, f"fleecing-{mode}", "fleecing_throughput.py",
                         [*common, "--mode", mode], log)
        if data:
            figures += engines_figures(f"fleecing ({mode})", data, [
                ("cow", "guest write while fleecing"), ("fleece", "fleece export read")])
    data = run_bench(out, "copy", "copy_throughput.py", common, log)
    if data:
        srv = data["engines"].get("blockd", {})
        for key, peer_key, label, peer in (
                ("copy_qcow2", "qemu_img", "pull to qcow2 (blockd.copy)", "qemu-img convert"),
                ("copy_raw", "nbdcopy", "pull to raw (blockd.copy)", "nbdcopy"),
                ("alloc_copy_qcow2", "alloc_qemu_img", "pull to qcow2, zero-filled disk",
                 "qemu-img convert")):
            if srv.get(f"{key}_mibs") and srv.get(f"{peer_key}_mibs"):
                figures.append(fig("copy", label, "MiB/s", srv[f"{key}_mibs"], peer,
                                   srv[f"{peer_key}_mibs"]))
    data = run_bench(out, "load", "load.py", ["--seconds", load_s], log)
    if data:
        by = {r["engine"]: r for r in data}
        if "blockd" in by and "qsd" in by:
            figures.append(fig("load", "16 exports, 4 fleecing jobs: throughput", "MiB/s",
                               by["blockd"]["mib_per_s"], "qemu-storage-daemon",
                               by["qsd"]["mib_per_s"]))
            figures.append(fig("load", "engine RSS at the end", "MiB",
                               by["blockd"]["rss_mib"]["end"], "qemu-storage-daemon",
                               by["qsd"]["rss_mib"]["end"], higher=False))
    for f in figures:   # the bench JSON each figure comes from, in the output directory
        f["source"] = f"{f['bench'].replace(' (', '-').rstrip(')')}.json"
    figures += [{**f, "source": None} for f in qmp_figures(1.0 if a.quick else 3.0)]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": a.quick, "size_mib": size, "seconds": round(time.monotonic() - t0, 1),
              "benches": log, "figures": figures}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(figures, out / "report.png",
         f"blockd ÷ peer, {size} MiB images, {report['date'][:10]}"
         f"{' (quick)' if a.quick else ''}")
    table = markdown(figures)
    if a.markdown:
        a.markdown.write_text(table)
    print(table)
    print(f"report: {out / 'report.json'}, {out / 'report.png'} ({report['seconds']} s)")
    return 1 if any(b["exit_code"] for b in log) else 0


if __name__ == "__main__":
    sys.exit(main())
