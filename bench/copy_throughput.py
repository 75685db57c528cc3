"""Backup pull speed: nbd_copy (blockd.copy) against qemu-img convert and nbdcopy.

Each engine (qsd, blockd) serves, read-only over NBD on a unix socket, a raw image
that is half allocated (4 MiB of random data every 8 MiB, in /dev/shm when it fits);
from that same export, --runs times, the four commands in turn in every run (so that
the noise of a shared machine hits them alike), wall time of the whole process,
start-up included, and its CPU time (user + system, from the kernel's accounting of
the child):

  qemu-img   qemu-img convert -O qcow2 URI out.qcow2        (the reference)
  copy-q     python3 -m blockd.copy pull URI out.qcow2 -O qcow2  (manifest, checksums)
  copy-r     python3 -m blockd.copy pull URI out.raw
  nbdcopy    nbdcopy URI out.raw                             (raw only)

Then the same image with its holes written as zeroes (allocated: block status
says data, as on a preallocated or zero-filled disk), pulled into qcow2 by qemu-img
convert and nbd_copy, which must both find the zeroes and leave them out.
Then a 1 TiB empty (null-co, read-zeroes) export pulled into qcow2 by nbd_copy and by
qemu-img convert, in seconds.  Then the incremental: a writable copy of the image with
a dirty bitmap exported (``qemu:dirty-bitmap:b0``), a full nbd_copy pull into qcow2,
1% of the disk rewritten (64 KiB pieces spread over the disk, through NBD), and an
incremental pull (``--base`` the full, ``--dirty-bitmap b0``): its time relative to the
full, and the result compared with the disk (qemu-img compare through the chain).  With --verify (default) every output is compared with
the image (qemu-img compare).  MiB/s are of the virtual size, from the median run
(the best run in the JSON too); the ratio copy-q/qemu-img of the medians is the
target (>= 1.0).  --json PATH writes everything.  Standard library only.

Example:  python3 bench/copy_throughput.py --engines qsd,blockd --size-mib 1024 --runs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbd_throughput import (  # noqa: E402  pylint: disable=wrong-import-position
    EXPORT, MiB, REPO, add_common_args, emit, pick_dir, print_rows, run_engine, timed,
    tool_version)

TIB = 1 << 40
METRICS = (("qemu_img", "qemu-img convert -O qcow2"),
           ("copy_qcow2", "nbd_copy -> qcow2 (+manifest)"),
           ("copy_raw", "nbd_copy -> raw (+manifest)"),
           ("nbdcopy", "nbdcopy -> raw"))


def ro_args(image: Path, workdir: Path) -> list[str]:
    """qsd arguments: IMAGE as a read-only raw export."""
    return ["--blockdev", f"driver=file,node-name=file0,filename={image},read-only=on",
            "--blockdev", "driver=raw,node-name=src0,file=file0,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
            "--export", f"type=nbd,id=exp0,node-name=src0,name={EXPORT}",
            "--chardev", f"socket,path={workdir / 'qmp.sock'},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]


def null_args(_image: Path, workdir: Path) -> list[str]:
    """qsd arguments: a 1 TiB null-co export that reads zeroes."""
    return ["--blockdev", f"driver=null-co,node-name=src0,size={TIB},read-zeroes=on",
            "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
            "--export", f"type=nbd,id=exp0,node-name=src0,name={EXPORT}",
            "--chardev", f"socket,path={workdir / 'qmp.sock'},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]


def rw_args(image: Path, workdir: Path) -> list[str]:
    """qsd arguments: a writable copy of IMAGE, exported later over QMP (with a bitmap)."""
    copy = workdir / "inc-image.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    return ["--blockdev", f"driver=file,node-name=file0,filename={copy}",
            "--blockdev", "driver=raw,node-name=src0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
            "--chardev", f"socket,path={workdir / 'qmp.sock'},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]


def qmp(workdir: Path, *commands: tuple) -> list:
    """Run (name, arguments) QMP commands on WORKDIR/qmp.sock; their returns."""
    import json
    import socket
    out = []
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(workdir / "qmp.sock"))
        f = s.makefile("rb")
        f.readline()
        for name, arguments in (("qmp_capabilities", {}), *commands):
            s.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']['desc']}")
            out.append(reply["return"])
    return out[1:]


def half_allocated(path: Path, size: int, zeros: bool = False) -> None:
    """4 MiB of random data every 8 MiB, holes between (ZEROS: written zeroes between,
    allocated, so that block status reports data: a preallocated or zero-filled disk)."""
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 8 * MiB):
            f.seek(off)
            f.write(block[:min(4 * MiB, size - off)])
            if zeros and off + 4 * MiB < size:
                f.write(bytes(min(4 * MiB, size - off - 4 * MiB)))


def copy_cmd(uri: str, out: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "blockd.copy", "pull", uri, str(out), "--format", fmt,
            "--overwrite", "--no-resume"]


def commands(uri: str, wd: Path) -> dict:
    return {"qemu_img": (["qemu-img", "convert", "-O", "qcow2", uri, str(wd / "q.qcow2")],
                         wd / "q.qcow2", "qcow2"),
            "copy_qcow2": (copy_cmd(uri, wd / "c.qcow2", "qcow2"), wd / "c.qcow2", "qcow2"),
            "copy_raw": (copy_cmd(uri, wd / "c.raw", "raw"), wd / "c.raw", "raw"),
            "nbdcopy": (["nbdcopy", uri, str(wd / "n.raw")], wd / "n.raw", "raw")}


def clean(path: Path) -> None:
    for p in (path, Path(str(path) + ".manifest.json")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def timed_cpu(cmd: list[str], timeout: float) -> tuple[float, float]:
    """Run CMD: (wall seconds, CPU seconds of the child: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def verify_into(res: dict, key: str, reference: Path, out: Path, fmt: str,
                timeout: float) -> None:
    """qemu-img compare OUT (FMT) with the raw REFERENCE: ``res[KEY_verified]``, and
    ``res["error"]`` when they differ."""
    cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt,
                          str(reference), str(out)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    res[f"{key}_verified"] = cmp.returncode == 0
    if cmp.returncode:
        res["error"] = f"{key}: output differs: {cmp.stdout}{cmp.stderr}"


def bench_engine(name: str, args, image: Path, work: Path) -> dict:
    def body(eng, res: dict) -> None:
        cmds = commands(eng.uri, eng.workdir)
        walls: dict = {m: [] for m in cmds}
        cpus: dict = {m: [] for m in cmds}
        for _run in range(args.runs):
            for metric, (cmd, out, fmt) in cmds.items():
                clean(out)
                wall, cpu = timed_cpu(cmd, args.timeout)
                walls[metric].append(wall)
                cpus[metric].append(cpu)
                if args.verify and _run == 0:
                    verify_into(res, metric, image, out, fmt, args.timeout)
                clean(out)
        for metric in cmds:
            res[f"{metric}_seconds"] = [round(r, 3) for r in walls[metric]]
            res[f"{metric}_cpu_seconds"] = [round(r, 3) for r in cpus[metric]]
            res[f"{metric}_mibs"] = round(args.size_mib / statistics.median(walls[metric]), 1)
            res[f"{metric}_best_mibs"] = round(args.size_mib / min(walls[metric]), 1)
            res[f"{metric}_cpu_median"] = round(statistics.median(cpus[metric]), 3)

    def sparse(eng, res: dict) -> None:
        for metric, (cmd, out, _fmt) in commands(eng.uri, eng.workdir).items():
            if metric in ("qemu_img", "copy_qcow2"):
                clean(out)
                res[f"tib_{metric}_seconds"] = round(min(timed(cmd, args.timeout)
                                                         for _r in range(args.runs)), 3)
                clean(out)

    def incremental(eng, res: dict) -> None:
        sys.path.insert(0, str(REPO / "plugins" / "module_utils"))
        from blockd.nbd.client import connect_uri  # pylint: disable=import-outside-toplevel
        full, inc = eng.workdir / "full.qcow2", eng.workdir / "inc.qcow2"
        fulls, incs = [], []
        for _run in range(args.runs):
            for path in (full, inc):
                clean(path)
            # an exported bitmap is busy (cannot be cleared): a new bitmap and export per run
            bitmap, export = f"b{_run}", f"inc{_run}"
            qmp(eng.workdir, ("block-dirty-bitmap-add", {"node": "src0", "name": bitmap}),
                ("block-export-add", {"type": "nbd", "id": export, "node-name": "src0",
                                      "name": export, "writable": True, "bitmaps": [bitmap]}))
            uri = f"nbd+unix:///{export}?socket={eng.workdir / 'nbd.sock'}"
            fulls.append(timed(copy_cmd(uri, full, "qcow2"), args.timeout))
            size = args.size_mib * MiB
            pieces = max(1, size // 100 // (64 << 10))
            with connect_uri(uri) as client:
                for i in range(pieces):
                    client.pwrite(i * (size // pieces), os.urandom(64 << 10))
                client.flush()
            incs.append(timed(copy_cmd(uri, inc, "qcow2")
                              + ["--base", str(full), "--dirty-bitmap", bitmap], args.timeout))
            if args.verify and _run == 0:
                verify_into(res, "incremental", eng.workdir / "inc-image.raw", inc, "qcow2",
                            args.timeout)
        res["incremental_full_seconds"] = round(statistics.median(fulls), 3)
        res["incremental_seconds"] = round(statistics.median(incs), 3)
        res["incremental_ratio"] = round(statistics.median(incs) / statistics.median(fulls), 3)
        for path in (full, inc):
            clean(path)

    def allocated(eng, res: dict) -> None:
        """The same data, the holes written as zeroes: qemu-img and nbd_copy must find them."""
        for metric, (cmd, out, fmt) in commands(eng.uri, eng.workdir).items():
            if metric not in ("qemu_img", "copy_qcow2"):
                continue
            walls = []
            for _run in range(args.runs):
                clean(out)
                walls.append(timed(cmd, args.timeout))
                if args.verify and _run == 0:
                    verify_into(res, f"alloc_{metric}", alloc, out, fmt, args.timeout)
            clean(out)
            res[f"alloc_{metric}_seconds"] = [round(r, 3) for r in walls]
            res[f"alloc_{metric}_mibs"] = round(args.size_mib / statistics.median(walls), 1)

    res = run_engine(name, args, image, work, body, make_args=ro_args)
    alloc = image.with_name("alloc-image.raw")
    res.update(run_engine(name, args, alloc, work, allocated, make_args=ro_args))
    res.update(run_engine(name, args, image, work, sparse, make_args=null_args))
    res.update(run_engine(name, args, image, work, incremental, make_args=rw_args))
    return res


def print_table(results: dict, engines: list[str]) -> None:
    print_rows(results, engines, METRICS, width=36)
    eng = results["engines"]
    for metric, label in (("qemu_img", "1 TiB sparse: qemu-img convert (s)"),
                          ("copy_qcow2", "1 TiB sparse: nbd_copy (s)")):
        print(f"{label:36}" + "".join(f"{eng[e].get(f'tib_{metric}_seconds', float('nan')):>10.3f}"
                                      for e in engines))
    for metric, label in (("qemu_img", "zero-filled: qemu-img convert"),
                          ("copy_qcow2", "zero-filled: nbd_copy -> qcow2")):
        print(f"{label:36}" + "".join(f"{eng[e].get(f'alloc_{metric}_mibs', float('nan')):>10.1f}"
                                      for e in engines))
    for key, label in (("incremental_full_seconds", "full pull, qcow2 (s)"),
                       ("incremental_seconds", "incremental after 1% changed (s)"),
                       ("incremental_ratio", "incremental / full")):
        print(f"{label:36}" + "".join(f"{eng[e].get(key, float('nan')):>10.3f}"
                                      for e in engines))
    print(f"{'CPU s (median): ' + ', '.join(m for m, _l in METRICS):36}")
    for e in engines:
        r = eng[e]
        print(f"  {e}: " + "  ".join(f"{r.get(f'{m}_cpu_median', float('nan')):.3f}"
                                     for m, _l in METRICS))
    for e in engines:
        r = eng[e]
        if "copy_qcow2_mibs" in r and "qemu_img_mibs" in r:
            print(f"{e}: nbd_copy/qemu-img (qcow2) = "
                  f"{r['copy_qcow2_mibs'] / r['qemu_img_mibs']:.3f} (median runs), "
                  f"{r['copy_qcow2_best_mibs'] / r['qemu_img_best_mibs']:.3f} (best runs); "
                  f"nbd_copy raw/nbdcopy = {r['copy_raw_mibs'] / r['nbdcopy_mibs']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=1, verify_help="skip the qemu-img compare of the outputs")
    p.add_argument("--no-bytecode-cache", dest="bytecode_cache", action="store_false",
                   help="leave PYTHONDONTWRITEBYTECODE as it is: with it set and no "
                        "__pycache__, every nbd_copy run compiles blockd from source")
    args = p.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "plugins" / "module_utils"),
                                                             os.environ.get("PYTHONPATH")]))
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    size = args.size_mib * MiB
    work = pick_dir(args.dir, 5 * size)
    results: dict = {"size_mib": args.size_mib, "runs": args.runs, "unit": "MiB/s",
                     "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
                     "bytecode_cache": args.bytecode_cache,
                     "work_dir": str(work),
                     "tools": {"qemu-img": tool_version(["qemu-img", "--version"]),
                               "nbdcopy": tool_version(["nbdcopy", "--version"])},
                     "engines": {}}
    try:
        if args.bytecode_cache:
            # As an installed package: bytecode compiled once (into the work
            # directory, not the checkout) and reused by every run.
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
            subprocess.run([sys.executable, "-c", "import blockd.copy.__main__, "
                            "blockd.drivers.qcow2.create, blockd.graph.graph"], check=True)
        image = work / "image.raw"
        half_allocated(image, size)
        half_allocated(image.with_name("alloc-image.raw"), size, zeros=True)
        for name in engines:
            print(f"... {name}", file=sys.stderr, flush=True)
            results["engines"][name] = bench_engine(name, args, image, work)
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    emit(results, engines, args, print_table)
    return 1 if any("error" in r for r in results["engines"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
