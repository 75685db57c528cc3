"""NBD throughput of blockd against qemu-storage-daemon, in one run.

Each engine serves the same raw image (random data, in /dev/shm when it fits, so
the page cache is warm) as a writable NBD export on a unix socket, started with
the same qemu-storage-daemon 7.2 command line.  One engine runs at a time.
Measured with libnbd's nbdcopy, best of --runs:

  read   nbdcopy nbd+unix:///bench?socket=...  null:      (connections as nbdcopy
                                                         chooses: multi-conn if offered)
  write  nbdcopy source.raw  nbd+unix:///bench?socket=...

After the writes the export is compared with source.raw (qemu-img compare), so an
engine that drops data cannot look fast.  Prints MiB/s per engine and the ratio
blockd/qsd; --json PATH writes everything as JSON.  Standard library only.

Example:  python3 bench/nbd_throughput.py --engines qsd,blockd --size-mib 1024 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
EXPORT = "bench"
METRICS = (("read", "seq read   nbdcopy export -> null:"),
           ("write", "seq write  nbdcopy file -> export"))
METRIC_NAMES = [m for m, _label in METRICS]


def engine_command(engine: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    if engine == "qsd":
        return shlex.split(args.qsd_cmd), {}
    if engine == "blockd":
        if args.blockd_cmd:
            return shlex.split(args.blockd_cmd), {}
        pythonpath = os.pathsep.join(filter(None, [str(REPO / "plugins" / "module_utils"),
                                                   os.environ.get("PYTHONPATH")]))
        return [sys.executable, "-m", "blockd"], {"PYTHONPATH": pythonpath}
    raise SystemExit(f"unknown engine {engine!r} (qsd, blockd)")


def qsd_args(image: Path, workdir: Path) -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", "driver=raw,node-name=src0,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}",
        "--export", f"type=nbd,id=exp0,node-name=src0,name={EXPORT},writable=on",
        "--chardev", f"socket,path={workdir / 'qmp.sock'},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]


# --- engine process -----------------------------------------------------------------

class Engine:
    def __init__(self, name: str, argv: list[str], env: dict, workdir: Path):
        self.name, self.argv, self.workdir = name, argv, workdir
        self.log = workdir / "engine.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=workdir, env={**os.environ, **env},
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.uri = f"nbd+unix:///{EXPORT}?socket={workdir / 'nbd.sock'}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """QMP greeting (the main loop runs), then a clean NBD handshake (NBD_OPT_ABORT)."""
        deadline = time.monotonic() + timeout
        for probe in (self._qmp_greeting, self._nbd_handshake):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited (rc={self.proc.returncode}) "
                                       f"during start-up:\n{self.output()}")
                try:
                    probe()
                    break
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n"
                                           f"{self.output()}") from None
                    time.sleep(0.05)

    def _connect(self, name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(self.workdir / name))
        except OSError:
            s.close()
            raise
        return s

    def _qmp_greeting(self) -> None:
        with self._connect("qmp.sock") as s:
            if b"QMP" not in s.makefile("rb").readline():
                raise ValueError("no QMP greeting")

    def _nbd_handshake(self) -> None:
        with self._connect("nbd.sock") as s:
            hello = s.makefile("rb").read(18)
            if len(hello) != 18 or hello[:16] != b"NBDMAGICIHAVEOPT":
                raise ValueError("no NBD greeting")
            s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
            try:
                s.recv(20)
            except OSError:
                pass

    def quit(self, timeout: float = 20.0) -> int | None:
        """quit over QMP; SIGTERM/SIGKILL if that does not end it."""
        if self.proc.poll() is None:
            try:
                with self._connect("qmp.sock") as s:
                    f = s.makefile("rb")
                    f.readline()
                    for cmd in ("qmp_capabilities", "quit"):
                        s.sendall(json.dumps({"execute": cmd}).encode())
                        f.readline()
            except OSError:
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                    return self.proc.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        return self.proc.poll()


# --- measuring ----------------------------------------------------------------------------

def timed(cmd: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def fill(path: Path, size: int, seed_block: bytes) -> None:
    with open(path, "wb") as f:
        for i in range(size // len(seed_block)):
            # a different first 8 bytes per block: no two blocks are identical
            f.write(struct.pack(">Q", i) + seed_block[8:])
        f.write(seed_block[: size % len(seed_block)])


def pick_dir(parent: str | None, need: int) -> Path:
    if parent is None:
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > need + 256 * MiB:
            parent = str(shm)
    return Path(tempfile.mkdtemp(prefix="blockd-bench-", dir=parent))


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def error_text(exc: BaseException) -> str:
    """An exception, with the stderr of a failed tool run when there is one."""
    detail = getattr(exc, "stderr", None)
    return f"{type(exc).__name__}: {exc}" + (
        f"\n{detail.decode(errors='replace') if isinstance(detail, bytes) else detail}"
        if detail else "")


def run_engine(name: str, args, image: Path, work: Path, body, make_args=None) -> dict:
    """Start engine NAME on IMAGE in WORK/NAME, run BODY(engine, result), return result.

    BODY runs once the engine is ready (QMP greeting, NBD handshake) and fills the
    result dict.  A failure of the start or of BODY is recorded as
    ``result["error"]`` (with the engine's output) instead of propagating; the
    engine is always quit and its exit code recorded.  MAKE_ARGS(image, workdir)
    gives the engine's options (default: :func:`qsd_args`).
    """
    prefix, env = engine_command(name, args)
    wd = work / name
    wd.mkdir(exist_ok=True)
    argv = [*prefix, *(make_args or qsd_args)(image, wd)]
    res: dict = {"cmd": argv}
    eng = Engine(name, argv, env, wd)
    try:
        eng.wait_ready()
        body(eng, res)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        res["error"] = error_text(exc)
    finally:
        res["exit_code"] = eng.quit()
        if "error" in res:
            res["engine_output"] = eng.output()[-4000:]
    return res


def bench_engine(name: str, args, image: Path, source: Path, work: Path) -> dict:
    def body(eng: Engine, res: dict) -> None:
        info = json.loads(subprocess.run(["nbdinfo", "--json", eng.uri], check=True,
                                         capture_output=True, text=True, timeout=60).stdout)
        exp = info["exports"][0]
        res["can_multi_conn"] = exp.get("can_multi_conn")
        res["export_size"] = exp.get("export-size")
        for metric, cmd in (("read", ["nbdcopy", eng.uri, "null:"]),
                            ("write", ["nbdcopy", str(source), eng.uri])):
            runs = [args.size_mib / timed(cmd, args.timeout) for _run in range(args.runs)]
            res[f"{metric}_runs"] = [round(r, 1) for r in runs]
            res[f"{metric}_mibs"] = round(max(runs), 1)
        if args.verify:
            cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                  eng.uri, str(source)], timeout=args.timeout, check=False,
                                 capture_output=True, text=True)
            res["write_verified"] = cmp.returncode == 0
            if cmp.returncode != 0:
                res["error"] = f"export differs from the written file: {cmp.stdout}{cmp.stderr}"
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
    best["write_verified"] = best.get("write_verified", True) and new.get("write_verified", True)
    return best


def add_common_args(p: argparse.ArgumentParser, rounds: int, verify_help: str) -> None:
    """The options every bench script shares (engines, size, runs, where, how)."""
    p.add_argument("--engines", default="qsd,blockd",
                   help="comma-separated, in run order (default: qsd,blockd)")
    p.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="runs per measure; best counts (3)")
    p.add_argument("--rounds", type=int, default=rounds,
                   help=f"start every engine this many times, alternating (default {rounds})")
    p.add_argument("--dir", help="parent of the work directory (default /dev/shm if it fits)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--qsd-cmd", default="qemu-storage-daemon", help="qsd program (shell words)")
    p.add_argument("--blockd-cmd", help="blockd program (shell words); default: "
                   "this python -m blockd with PYTHONPATH=plugins/module_utils")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=verify_help)
    p.add_argument("--timeout", type=float, default=600, help="seconds per nbdcopy run")
    p.add_argument("--keep", action="store_true", help="keep the work directory")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=2, verify_help="skip the qemu-img compare after the writes")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for tool in ("nbdcopy", "nbdinfo", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run `bash scripts/bootstrap`")

    size = args.size_mib * MiB
    work = pick_dir(args.dir, 2 * size)
    results: dict = {
        "size_mib": args.size_mib, "runs": args.runs, "rounds": args.rounds,
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
        fill(image, size, os.urandom(4 * MiB))
        fill(source, size, os.urandom(4 * MiB))
        for path in (image, source):          # warm the page cache
            with open(path, "rb") as f:
                while f.read(16 * MiB):
                    pass
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
    emit(results, engines, args, print_table)
    return 1 if any("error" in r for r in eng.values()) else 0


def add_ratios(results: dict, metrics) -> None:
    """``ratio_blockd_qsd`` for every metric both engines measured."""
    eng = results["engines"]
    if "qsd" in eng and "blockd" in eng:
        results["ratio_blockd_qsd"] = {
            m: round(eng["blockd"][f"{m}_mibs"] / eng["qsd"][f"{m}_mibs"], 3)
            for m in metrics if f"{m}_mibs" in eng["blockd"] and f"{m}_mibs" in eng["qsd"]}


def emit(results: dict, engines: list[str], args, printer) -> None:
    """Print the table and write ``--json``."""
    printer(results, engines)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def print_rows(results: dict, engines: list[str], metrics, width: int = 40) -> None:
    """The header and one row per (metric, label): MiB/s per engine, then blockd/qsd."""
    eng = results["engines"]
    ratio = results.get("ratio_blockd_qsd")
    print(f"{'':{width}}" + "".join(f"{e:>10}" for e in engines)
          + (f"{'blockd/qsd':>12}" if ratio else ""))
    for metric, label in metrics:
        row = f"{label:{width}}"
        for e in engines:
            row += f"{eng[e].get(f'{metric}_mibs', float('nan')):>10.1f}"
        if ratio:
            row += f"{ratio.get(metric, float('nan')):>12.3f}"
        print(row)


def print_table(results: dict, engines: list[str]) -> None:
    eng = results["engines"]
    print(f"NBD throughput, {results['size_mib']} MiB raw image in {results['work_dir']}, "
          f"unix socket, best of {results['runs'] * results['rounds']} runs, MiB/s")
    print_rows(results, engines, METRICS)
    for e in engines:
        r = eng[e]
        if "error" in r:
            print(f"{e}: ERROR {r['error']}\n{r.get('engine_output', '')}", file=sys.stderr)
        else:
            print(f"{e}: multi-conn {'yes' if r.get('can_multi_conn') else 'no'}, "
                  f"writes verified: {r.get('write_verified', 'skipped')}, "
                  f"read runs {r['read_runs']}, write runs {r['write_runs']}")


if __name__ == "__main__":
    sys.exit(main())
