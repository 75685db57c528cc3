"""NBD throughput of a qcow2 export, blockd against qemu-storage-daemon, in one run.

Each engine serves a qcow2 image (made by qemu-img, in /dev/shm when it fits) as a
writable NBD export on a unix socket, with the same qemu-storage-daemon 7.2 command line:

  --blockdev driver=qcow2,node-name=q,file.driver=file,file.filename=IMAGE
  --export type=nbd,id=exp0,node-name=q,name=bench,writable=on

Two images, both --size-mib large (default 1 GiB), cluster size --cluster-size:

  full   every cluster allocated with random data
  half   every other MiB allocated (random data), the rest unallocated

Each run starts the engine on a fresh copy of the image, then measures with libnbd's
nbdcopy (connections as nbdcopy chooses):

  read   nbdcopy export -> null:       (the image as made: holes stay holes)
  write  nbdcopy source.raw -> export  (overwrites the full image; on the half image
                                        it also allocates the other half)

After the write the daemon quits, and the image must pass ``qemu-img check`` and equal
source.raw (``qemu-img compare``), so an engine that corrupts or drops data cannot look
fast.  Best of --runs x --rounds counts.  Prints MiB/s per engine and the ratio
blockd/qsd; --json PATH writes everything as JSON.  Standard library only.

Example:  python3 bench/qcow2_throughput.py --engines qsd,blockd --size-mib 1024 --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbd_throughput import (MiB, add_common_args, add_ratios, emit, fill,  # noqa: E402
                            pick_dir, print_rows, run_engine, timed, tool_version)

IMAGES = ("full", "half")
METRICS = tuple((f"{img}_{op}", f"{img:5} {label}") for img in IMAGES for op, label in (
    ("read", "read   nbdcopy export -> null:"),
    ("write", "write  nbdcopy file -> export")))
METRIC_NAMES = [m for m, _label in METRICS]


def qsd_args(image: Path, workdir: Path) -> list[str]:
    return [
        "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
        "--export", "type=nbd,id=exp0,node-name=q,name=bench,writable=on",
        "--chardev", f"socket,path={workdir / 'qmp.sock'},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]


def run(cmd: list, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def make_images(work: Path, size: int, cluster: int) -> dict:
    """The pristine qcow2 images, made by qemu-img from random raw data."""
    data = work / "data.raw"
    fill(data, size, os.urandom(4 * MiB))
    full = work / "full.qcow2"
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
         f"cluster_size={cluster}", data, full])
    half = work / "half.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
         half, str(size)])
    cmds = []
    for off in range(0, size, 2 * MiB):
        cmds += ["-c", f"write -P {(off // MiB) % 251 + 1} {off} {min(MiB, size - off)}"]
    for i in range(0, len(cmds), 512):
        run(["qemu-io", "-f", "qcow2", *cmds[i:i + 512], half])
    data.unlink()
    return {"full": full, "half": half}


def bench_once(name: str, args, pristine: Path, source: Path, work: Path) -> dict:
    """One engine start on a fresh copy: read, write, quit, check."""
    (work / name).mkdir(exist_ok=True)
    image = work / name / "image.qcow2"
    shutil.copyfile(pristine, image)

    def body(eng, res: dict) -> None:
        res["read"] = args.size_mib / timed(["nbdcopy", eng.uri, "null:"], args.timeout)
        res["write"] = args.size_mib / timed(["nbdcopy", str(source), eng.uri], args.timeout)
    res = run_engine(name, args, image, work, body, make_args=qsd_args)
    if "error" not in res and args.verify:
        chk = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(image)],
                             capture_output=True, text=True, timeout=args.timeout, check=False)
        cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
                              str(image), str(source)], capture_output=True, text=True,
                             timeout=args.timeout, check=False)
        res["verified"] = chk.returncode == 0 and cmp.returncode == 0
        if not res["verified"]:
            res["error"] = f"image check/compare failed: {chk.stdout}{chk.stderr}" \
                           f"{cmp.stdout}{cmp.stderr}"
    image.unlink(missing_ok=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=1, verify_help="skip qemu-img check/compare after the writes")
    p.add_argument("--cluster-size", type=int, default=65536, help="qcow2 cluster size (64k)")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for tool in ("nbdcopy", "nbdinfo", "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run `bash scripts/bootstrap`")
    size = args.size_mib * MiB
    work = pick_dir(args.dir, 5 * size)
    results: dict = {
        "size_mib": args.size_mib, "cluster_size": args.cluster_size, "runs": args.runs,
        "rounds": args.rounds, "work_dir": str(work), "unit": "MiB/s",
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version()},
        "tools": {"nbdcopy": tool_version(["nbdcopy", "--version"]),
                  "qsd": tool_version([*shlex.split(args.qsd_cmd), "--version"])
                  if "qsd" in engines else None},
        "engines": {e: {"runs": {m: [] for m in METRIC_NAMES}} for e in engines},
    }
    try:
        images = make_images(work, size, args.cluster_size)
        source = work / "source.raw"
        fill(source, size, os.urandom(4 * MiB))
        for _round in range(args.rounds):
            for name in engines:
                for img in IMAGES:
                    for _run in range(args.runs):
                        print(f"... {name} {img}", file=sys.stderr, flush=True)
                        res = bench_once(name, args, images[img], source, work)
                        eng = results["engines"][name]
                        if "error" in res:
                            eng.setdefault("errors", []).append(res)
                            continue
                        eng["cmd"] = res["cmd"]
                        for op in ("read", "write"):
                            eng["runs"][f"{img}_{op}"].append(round(res[op], 1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for eng in results["engines"].values():
        for m in METRIC_NAMES:
            if eng["runs"][m]:
                eng[f"{m}_mibs"] = max(eng["runs"][m])
    eng = results["engines"]
    add_ratios(results, METRIC_NAMES)
    emit(results, engines, args, print_table)
    return 1 if any("errors" in r for r in eng.values()) else 0


def print_table(results: dict, engines: list[str]) -> None:
    eng = results["engines"]
    print(f"qcow2 NBD throughput, {results['size_mib']} MiB images, "
          f"{results['cluster_size'] // 1024} KiB clusters, in {results['work_dir']}, "
          f"unix socket, best of {results['runs'] * results['rounds']} runs, MiB/s")
    print_rows(results, engines, METRICS, width=42)
    for e in engines:
        for err in eng[e].get("errors", []):
            print(f"{e}: ERROR {err['error']}\n{err.get('engine_output', '')}", file=sys.stderr)
        print(f"{e}: runs {eng[e]['runs']}")


if __name__ == "__main__":
    sys.exit(main())
