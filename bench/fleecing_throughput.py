"""Fleecing cost and fleecing-export speed, blockd against qemu-storage-daemon, in one run.

Each engine serves a raw disk (random data, in /dev/shm when it fits) as a writable NBD
export ``bench`` with the same qemu-storage-daemon 7.2 command line, then measures with
libnbd's nbdcopy, best of --runs x --rounds:

  plain   nbdcopy source.raw -> bench                 writes, no fleecing
  cow     nbdcopy source.raw -> bench                 writes while fleecing runs: the first
                                                      write to every cluster copies the old
                                                      cluster into the fleecing target first
  fleece  nbdcopy fleece -> null:                     reads of the point-in-time export, all
                                                      falling through to the live disk

Fleecing is set up fresh for every ``cow`` and ``fleece`` run, over QMP, as an operator
would (--mode):

  backup  seed 000: a qcow2 target (file in the work dir) whose backing is the disk,
          ``blockdev-backup sync=none``, the target exported read-only as ``fleece``
  cbw     the copy-before-write filter over the disk with the same qcow2 target, and a
          ``snapshot-access`` node exported read-only as ``fleece``

and torn down afterwards (export deleted, job cancelled, nodes deleted).  After each
``cow`` run the fleecing export must still equal the disk as it was (``qemu-img
compare`` against the image before the writes, with --verify), so an engine that skips
the copy cannot look fast.  Prints MiB/s, the CoW ratio cow/plain per engine and the
ratios blockd/qsd; --json PATH writes everything.  Standard library only.

Example:  python3 bench/fleecing_throughput.py --engines qsd,blockd --size-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbd_throughput import (MiB, add_common_args, add_ratios, emit, fill,  # noqa: E402
                            pick_dir, print_rows, run_engine, timed, tool_version)

METRICS = (("plain", "write, no fleecing      file -> disk"),
           ("cow", "write while fleecing    file -> disk"),
           ("fleece", "read fleecing export    fleece -> null:"))
METRIC_NAMES = [m for m, _label in METRICS]


class QMP:
    """A minimal QMP client (the bench needs no third-party package)."""

    def __init__(self, path: Path, size: int) -> None:
        #: the disk's size (for the fleecing target)
        self.size = size
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, execute: str, **args) -> object:
        self.file.write(json.dumps({"execute": execute, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "event" in msg:
                continue
            if "error" in msg:
                raise RuntimeError(f"{execute}: {msg['error']['desc']}")
            return msg["return"]

    def close(self) -> None:
        self.sock.close()


def fleece_up(q: QMP, mode: str, target: Path) -> None:
    """Start fleecing of src0 into ``target`` and export the point-in-time view as ``fleece``."""
    if target.exists():
        target.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target),
                    str(q.size)], check=True)
    q.cmd("blockdev-add", **{"node-name": "tgt", "driver": "qcow2", "backing": "src0",
                             "file": {"driver": "file", "filename": str(target)}})
    if mode == "backup":
        q.cmd("blockdev-backup", **{"job-id": "fleece", "device": "src0", "target": "tgt",
                                    "sync": "none"})
        node = "tgt"
    else:
        q.cmd("blockdev-add", **{"node-name": "cbw", "driver": "copy-before-write",
                                 "file": "src0", "target": "tgt"})
        # the writer's export moves onto the filter: re-add it there
        q.cmd("block-export-del", id="exp0")
        wait_export_gone(q, "exp0")
        q.cmd("block-export-add", type="nbd", id="exp0", **{"node-name": "cbw"},
              name="bench", writable=True)
        q.cmd("blockdev-add", **{"node-name": "snap", "driver": "snapshot-access",
                                 "file": "cbw"})
        node = "snap"
    q.cmd("block-export-add", type="nbd", id="fl", **{"node-name": node}, name="fleece",
          writable=False)


def wait_export_gone(q: QMP, export_id: str) -> None:
    for _ in range(600):
        if all(e["id"] != export_id for e in q.cmd("query-block-exports")):
            return
        time.sleep(0.05)
    raise RuntimeError(f"export {export_id} not deleted")


def fleece_down(q: QMP, mode: str) -> None:
    q.cmd("block-export-del", id="fl")
    wait_export_gone(q, "fl")
    if mode == "backup":
        q.cmd("block-job-cancel", device="fleece")
        for _ in range(600):
            if not q.cmd("query-block-jobs"):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("backup job did not end")
    else:
        q.cmd("blockdev-del", **{"node-name": "snap"})
        q.cmd("block-export-del", id="exp0")
        wait_export_gone(q, "exp0")
        q.cmd("block-export-add", type="nbd", id="exp0", **{"node-name": "src0"},
              name="bench", writable=True)
        q.cmd("blockdev-del", **{"node-name": "cbw"})
    q.cmd("blockdev-del", **{"node-name": "tgt"})


def bench_engine(name: str, args, image: Path, source: Path, work: Path) -> dict:
    wd = work / name
    fleece_uri = f"nbd+unix:///fleece?socket={wd / 'nbd.sock'}"
    target = wd / "fleece.qcow2"
    original = str(image.with_suffix(".orig"))

    def body(eng, res: dict) -> None:
        res["mode"] = args.mode
        q = QMP(wd / "qmp.sock", args.size_mib * MiB)
        try:
            runs: dict = {m: [] for m in METRIC_NAMES}
            for _run in range(args.runs):
                runs["plain"].append(timed(["nbdcopy", str(source), eng.uri], args.timeout))
                # back to the original disk so every cow run copies real old data
                timed(["nbdcopy", original, eng.uri], args.timeout)
                fleece_up(q, args.mode, target)
                runs["fleece"].append(timed(["nbdcopy", fleece_uri, "null:"], args.timeout))
                runs["cow"].append(timed(["nbdcopy", str(source), eng.uri], args.timeout))
                if args.verify:
                    cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                          fleece_uri, original], timeout=args.timeout,
                                         check=False, capture_output=True, text=True)
                    if cmp.returncode != 0:
                        raise RuntimeError("fleecing export changed under writes: "
                                           f"{cmp.stdout}{cmp.stderr}")
                    res["fleece_verified"] = True
                fleece_down(q, args.mode)
                timed(["nbdcopy", original, eng.uri], args.timeout)
        finally:
            q.close()   # the monitor serves one client: free it for the quit
        for metric, times in runs.items():
            speeds = [args.size_mib / t for t in times]
            res[f"{metric}_runs"] = [round(v, 1) for v in speeds]
            res[f"{metric}_mibs"] = round(max(speeds), 1)
        res["cow_ratio"] = round(res["cow_mibs"] / res["plain_mibs"], 3)
    return run_engine(name, args, image, work, body)


def merge(best: dict | None, new: dict) -> dict:
    """Combine rounds: keep every run, best figure over all; a failed round is the result."""
    if best is None or "error" in best:
        return best or new      # the first failure stays reported
    if "error" in new:
        return new
    for metric in METRIC_NAMES:
        best[f"{metric}_runs"] += new[f"{metric}_runs"]
        best[f"{metric}_mibs"] = max(best[f"{metric}_runs"])
    best["cow_ratio"] = round(best["cow_mibs"] / best["plain_mibs"], 3)
    return best


def print_table(results: dict, engines: list[str]) -> None:
    eng = results["engines"]
    ratio = results.get("ratio_blockd_qsd")
    print(f"Fleecing ({results['mode']}), {results['size_mib']} MiB raw disk in "
          f"{results['work_dir']}, unix socket, best of {results['runs'] * results['rounds']} "
          "runs, MiB/s")
    print_rows(results, engines, METRICS, width=42)
    row = f"{'CoW ratio cow/plain':42}"
    for e in engines:
        row += f"{eng[e].get('cow_ratio', float('nan')):>10.3f}"
    if ratio and "cow_ratio" in ratio:
        row += f"{ratio['cow_ratio']:>12.3f}"
    print(row)
    for e in engines:
        r = eng[e]
        if "error" in r:
            print(f"{e}: ERROR {r['error']}\n{r.get('engine_output', '')}", file=sys.stderr)
        else:
            print(f"{e}: fleecing export verified: {r.get('fleece_verified', 'skipped')}, "
                  + ", ".join(f"{m} runs {r[f'{m}_runs']}" for m in METRIC_NAMES))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=1, verify_help="skip checking the fleecing export after writes")
    p.add_argument("--mode", choices=("backup", "cbw"), default="backup",
                   help="blockdev-backup sync=none (default) or copy-before-write + "
                        "snapshot-access")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for tool in ("nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run `bash scripts/bootstrap`")
    size = args.size_mib * MiB
    work = pick_dir(args.dir, 5 * size)
    results: dict = {
        "size_mib": args.size_mib, "runs": args.runs, "rounds": args.rounds, "mode": args.mode,
        "work_dir": str(work), "unit": "MiB/s",
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version()},
        "tools": {"nbdcopy": tool_version(["nbdcopy", "--version"]),
                  "qsd": tool_version([*shlex.split(args.qsd_cmd), "--version"])
                  if "qsd" in engines else None},
        "engines": {},
    }
    try:
        image, source = work / "image.raw", work / "source.raw"
        fill(image.with_suffix(".orig"), size, os.urandom(4 * MiB))
        shutil.copyfile(image.with_suffix(".orig"), image)
        fill(source, size, os.urandom(4 * MiB))
        for _round in range(args.rounds):
            for name in engines:
                print(f"... {name}", file=sys.stderr, flush=True)
                results["engines"][name] = merge(results["engines"].get(name),
                                                 bench_engine(name, args, image, source, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    eng = results["engines"]
    if not any("error" in eng.get(e, {}) for e in ("qsd", "blockd")):
        add_ratios(results, METRIC_NAMES)
        if "qsd" in eng and "blockd" in eng:
            results["ratio_blockd_qsd"]["cow_ratio"] = round(
                eng["blockd"]["cow_ratio"] / eng["qsd"]["cow_ratio"], 3)
    emit(results, engines, args, print_table)
    return 1 if any("error" in r for r in eng.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
