#!/usr/bin/env python3
"""Coverage-guided fuzzing of blockd, in process, with atheris (libFuzzer).

    .venv/bin/python bench/fuzz_cov.py --target all --runs 100000 --seed 1 [--json PATH]

bench/fuzz.py throws generated and mutated cases at a running blockd over its sockets; here
libFuzzer mutates its inputs towards new branches of blockd's own code: every blockd module is
imported through ``atheris.instrument_imports`` and the engine runs inside the fuzzing
process, so each input's coverage is seen (its threads included). Targets:

- ``qmp``: an input is the bytes a QMP client sends after ``qmp_capabilities`` (an input
  starting with ``#`` is sent as it is, before negotiation): a real :class:`Monitor` serves
  them on one end of a socket pair, for an in-process :class:`Daemon` with a ``null-co``
  node -- parser, dispatch, schema validation and the command handlers. Every reply must be
  a JSON object with ``return`` (or ``event``) or an ``error`` with ``class`` and ``desc``,
  never "internal error"; the monitor must end when the input ends; blockd must log no error.
  Every command is offered, ``quit``, ``blockdev-create`` and snapshots included: files are
  created in the work directory (below). The daemon is replaced whenever an input left jobs,
  an NBD server or more than 16 nodes behind, and every 500 inputs; files are removed when
  they fill a quarter of the work directory.
- ``nbd``: an input is what one client sends to blockd's NBD server (unix socket, same
  process): handshake, options, requests. Exports: ``r`` (read-only ``null-co``) and ``w``
  (a writable raw file with dirty bitmap ``b0``). The server must answer and close within
  10 s of the input's end, and log no error.
- ``qcow2``: an input is a whole qcow2 file (seeds: small qemu-img images with 512-byte
  clusters, snapshots, a bitmap, compat 0.10, 1-bit refcounts); blockd's qcow2 driver opens
  it read-only (reads, block status; the file must not change), then read-write (writes,
  zeroes, discards, flush) -- ``tests/integration/qcow2/qcow2_fuzz.py``'s session. Only
  clean refusals (QMPError on open, EIO and the like on I/O) are allowed.

libFuzzer gets a dictionary per target: the QMP schema's command, member and enum names
(JSON-quoted), the NBD magics, option and command codes and context names, the qcow2 magic.

Each target runs in its own process (one libFuzzer each) that chroots, after the imports,
into its work directory: a tmpfs of 512 MiB mounted for the run, so fuzzed paths cannot reach
the machine's files and a full disk is one more error path (root only: mount and chroot).
A finding stops that target (libFuzzer's way); its input is kept (``--keep DIR``) and
printed, and ``--target T --replay FILE...`` runs inputs once each through the same harness. The result: runs, libFuzzer's coverage (``cov``: edges, ``ft``: features) after
the seeds and at the end, corpus size, executions per second, findings.
tests/integration/fuzz/test_fuzz_cov_slice.py runs a seeded slice in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pkgutil
import random
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ("qmp", "nbd", "qcow2")
MAX_LEN = {"qmp": 4096, "nbd": 4096, "qcow2": 65536}
#: Size of each target's work directory (a tmpfs): the fuzzed engine's whole file system.
WORK_SIZE = "512m"
#: What the harness itself keeps in the work directory.
KEEP = {"corpus", "artifacts", "dict", "disk.raw", "work.qcow2", "nbd.sock"}


# -- the worker: one target, one libFuzzer, in a chroot ----------------------------------------
class Finding(Exception):
    """What the fuzzer must report: the input broke a rule."""


class LogCatcher:
    """Errors blockd logs (a monitor or NBD connection that failed inside)."""

    def __init__(self):
        self.records = []
        handler = logging.Handler(logging.ERROR)
        handler.emit = lambda rec: self.records.append(rec)
        logging.getLogger("blockd").addHandler(handler)

    def text(self) -> str:
        """The errors logged since the last call (with their tracebacks), and forget them."""
        records, self.records = self.records, []
        return "\n".join(logging.Formatter().format(rec) for rec in records)[-3000:]

    def check(self):
        if self.records:
            raise Finding("blockd logged an error: %s" % self.text())


def exchange(sock, data: bytes, timeout: float = 10.0) -> bytes:
    """Send DATA from a thread, then end the input; read until the peer closes."""

    def send():
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                            # the server hung up first: allowed
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out.append(chunk)
    except socket.timeout:
        raise Finding("no end of output %.0f s after the end of input" % timeout) from None
    finally:
        sender.join(timeout)
        sock.close()
    return b"".join(out)


class QMPTarget:
    def __init__(self):
        from blockd.daemon import Daemon  # pylint: disable=import-outside-toplevel
        self.daemon_class = Daemon
        self.log = LogCatcher()
        self.inputs = 0
        self.daemon = self._daemon()

    def _daemon(self):
        d = self.daemon_class()
        d.execute("blockdev-add", {"driver": "null-co", "node-name": "node0", "size": 1 << 20})
        return d

    def one(self, data: bytes) -> None:
        from blockd.qmp.server import Monitor  # pylint: disable=import-outside-toplevel
        payload = data[1:] if data[:1] == b"#" else b'{"execute": "qmp_capabilities"}' + data
        ours, theirs = socket.socketpair()
        mon = Monitor(self.daemon, theirs, name="fuzz")
        thread = threading.Thread(target=mon.serve, daemon=True)
        thread.start()
        out = exchange(ours, payload)
        thread.join(10)
        if thread.is_alive():
            raise Finding("the monitor did not end with its input")
        lines = out.split(b"\r\n")
        if lines[-1]:
            raise Finding("output does not end with CRLF: %r" % out[-200:])
        for line in lines[:-1]:
            try:
                msg = json.loads(line)
            except ValueError:  # an id too large for a double is echoed as inf, as qsd does
                msg = json.loads(re.sub(rb"\b(-?inf|nan)\b", b"null", line))
            if not isinstance(msg, dict):
                raise Finding("reply is not an object: %r" % line[:300])
            if "error" in msg:
                err = msg["error"]
                if set(err) != {"class", "desc"} or not isinstance(err["desc"], str):
                    raise Finding("malformed error: %r" % line[:300])
                if err["desc"].startswith("internal error"):
                    raise Finding("%s\n%s" % (err["desc"][:2000], self.log.text()))
            elif not {"return", "event", "QMP"} & set(msg):
                raise Finding("reply without return/error/event: %r" % line[:300])
        self.log.check()
        d = self.daemon
        st = os.statvfs("/")
        full = st.f_bfree < st.f_blocks * 3 // 4
        self.inputs += 1
        if d.jobs or d.nbd_server is not None or len(d.graph.nodes) > 16 \
                or self.inputs % 500 == 0 or d.shutdown_requested.is_set() or full:
            d.close()
            self.log.check()
            if full:
                for entry in os.scandir("/"):
                    if entry.name in KEEP:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
            self.daemon = self._daemon()


class NBDTarget:
    def __init__(self):
        from blockd.daemon import Daemon  # pylint: disable=import-outside-toplevel
        self.log = LogCatcher()
        with open("/disk.raw", "wb") as f:
            f.truncate(1 << 20)
        d = self.daemon = Daemon()
        d.execute("blockdev-add", {"driver": "null-co", "node-name": "r0", "size": 1 << 20,
                                   "read-zeroes": True})
        d.execute("blockdev-add", {"driver": "raw", "node-name": "w0",
                                   "file": {"driver": "file", "filename": "/disk.raw"}})
        d.execute("block-dirty-bitmap-add", {"node": "w0", "name": "b0"})
        d.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nbd.sock"}}})
        d.execute("block-export-add", {"type": "nbd", "id": "r", "node-name": "r0", "name": "r"})
        d.execute("block-export-add", {"type": "nbd", "id": "w", "node-name": "w0", "name": "w",
                                       "writable": True, "bitmaps": ["b0"]})

    def one(self, data: bytes) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("/nbd.sock")
        exchange(sock, data)
        self.log.check()


class Qcow2Target:
    def __init__(self):
        import qcow2_fuzz  # pylint: disable=import-outside-toplevel,import-error
        from blockd.errors import QMPError  # pylint: disable=import-outside-toplevel
        self.fuzz, self.qmp_error = qcow2_fuzz, QMPError
        self.stats = {"open_refused": 0, "io_failed": 0, "io_ok": 0}

    def one(self, data: bytes) -> None:
        rnd = random.Random(zlib.crc32(data))
        for read_only in (True, False):
            with open("/work.qcow2", "wb") as f:
                f.write(data)
            try:
                self.fuzz.session("/work.qcow2", read_only, rnd, self.stats)
            except self.qmp_error:
                if Path("/work.qcow2").read_bytes() != data:
                    raise Finding("a failed open changed the file") from None
                return
            except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
                raise Finding("read_only=%s: %s" % (read_only, traceback.format_exc()[-3000:])) \
                    from exc
            if read_only and Path("/work.qcow2").read_bytes() != data:
                raise Finding("a read-only session changed the file")


def worker(target: str, runs: int, seed: int, work: Path, replay: list | None = None) -> int:
    import atheris  # pylint: disable=import-outside-toplevel
    os.environ["QCOW2_FUZZ_LIGHT"] = "1"          # qcow2_fuzz: 64 KiB reads
    sys.path[:0] = [str(REPO / "plugins" / "module_utils"),
                    str(REPO / "tests" / "integration" / "qcow2")]
    with atheris.instrument_imports(include=["blockd"]):
        import blockd  # pylint: disable=import-outside-toplevel
        for mod in pkgutil.walk_packages(blockd.__path__, "blockd."):
            if not mod.name.endswith("__main__"):
                __import__(mod.name)
    # what blockd imports on first use, loaded before the chroot hides the library
    import ctypes.util  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import encodings.idna  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import atheris.core_with_libfuzzer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    if target == "qcow2":
        with atheris.instrument_imports(include=["blockd"]):
            import qcow2_fuzz  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import,import-error
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))   # a huge allocation: MemoryError
    from blockd.qmp.schema import Schema  # pylint: disable=import-outside-toplevel
    schema = Schema.default()             # read from the checkout, and every validator built
    for name in schema.commands():
        try:
            schema.validate(name, {})
        except Exception:  # noqa: BLE001 pylint: disable=broad-except
            pass
    harness = []
    if replay is not None:      # the inputs once each, without libFuzzer: reproducers
        inputs = [Path(p).read_bytes() for p in replay]
        os.chroot(str(work))
        os.chdir("/")
        harness.append({"qmp": QMPTarget, "nbd": NBDTarget, "qcow2": Qcow2Target}[target]())
        bad = 0
        for path, data in zip(replay, inputs):
            try:
                harness[0].one(data)
            except Exception as exc:  # noqa: BLE001 pylint: disable=broad-except
                bad += 1
                print("FINDING %s: %s" % (path, exc), file=sys.stderr)
        print(json.dumps({"replayed": len(inputs), "findings": bad}))
        return 1 if bad else 0

    def one(data: bytes) -> None:
        try:
            harness[0].one(data)
        except BaseException:
            sys.stderr.write("FINDING:\n%s" % traceback.format_exc()[-4000:])
            sys.stderr.flush()
            raise
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={MAX_LEN[target]}",
                   "-print_final_stats=1", "-artifact_prefix=/artifacts/", "-timeout=60",
                   "-rss_limit_mb=4096", "-dict=/dict", "/corpus"], one)   # (loads libFuzzer: before the chroot)
    os.chroot(str(work))
    os.chdir("/")
    harness.append({"qmp": QMPTarget, "nbd": NBDTarget, "qcow2": Qcow2Target}[target]())
    atheris.Fuzz()
    return 0


# -- seeds (made before the chroot, from bench/fuzz.py's generators) ---------------------------
def qmp_seeds() -> list[bytes]:
    from fuzz import SchemaGen  # pylint: disable=import-outside-toplevel
    gen = SchemaGen(random.Random(1))
    cmds = [json.dumps({"execute": c, "id": i,
                        "arguments": gen.value(gen.commands[c].get("args") or {})}).encode()
            for i, c in enumerate(sorted(gen.commands))]
    return cmds + [b'{"execute": "query-block"}', b"#{'execute': 'qmp_capabilities'}",
                   b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}']


def _dict_line(token: bytes) -> str:
    """One libFuzzer dictionary entry: the token quoted, every byte as \\xNN."""
    return '"%s"' % "".join("\\x%02x" % b for b in token)


def qmp_dict() -> list[bytes]:
    """Tokens of the QMP schema (command and member names, enum values), JSON-quoted: byte
    mutations alone rarely spell a command blockd has."""
    schema = json.loads((REPO / "plugins/module_utils/blockd/qmp/schema.json").read_text())
    words = set(schema["commands"]) | {"execute", "arguments", "id", "exec-oob"}

    def walk(node):
        if isinstance(node, dict):
            words.update(k for k in node.get("properties", {}) if isinstance(k, str))
            words.update(v for v in node.get("enum", []) if isinstance(v, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return sorted(json.dumps(w).encode() for w in words)


def nbd_dict() -> list[bytes]:
    """Magics, option and command codes as the protocol packs them."""
    from fuzz import proto  # pylint: disable=import-outside-toplevel
    out = [struct.pack(">Q", proto.IHAVEOPT), struct.pack(">I", proto.REQUEST_MAGIC),
           b"base:allocation", b"qemu:dirty-bitmap:b0", b"qemu:allocation-depth", b"qemu:"]
    out += [struct.pack(">I", getattr(proto, n)) for n in dir(proto) if n.startswith("OPT_")
            and isinstance(getattr(proto, n), int)]
    out += [struct.pack(">H", getattr(proto, n)) for n in dir(proto) if n.startswith("CMD_")
            and not n.startswith("CMD_FLAG") and isinstance(getattr(proto, n), int)
            and getattr(proto, n) < 1 << 16]
    return out


def nbd_seeds() -> list[bytes]:
    """Well-formed sessions (every command, on both exports) and bench/fuzz.py's hostile ones."""
    from fuzz import nbd_case, proto  # pylint: disable=import-outside-toplevel

    def req(cmd, off=0, length=4096, flags=0, cookie=1):
        return struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, cmd, cookie, off, length)
    hello = struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)
    structured = proto.pack_option(proto.OPT_STRUCTURED_REPLY)
    meta = proto.pack_option(proto.OPT_SET_META_CONTEXT, proto.pack_meta_request(
        "w", ("base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth")))
    out = []
    for name in ("r", "w"):
        for pre in (b"", structured, structured + meta):
            go = hello + pre + proto.pack_option(proto.OPT_GO, proto.pack_info_request(name))
            out.append(go + req(proto.CMD_READ, 0, 512) + req(proto.CMD_DISC, 0, 0))
            out.append(go + req(proto.CMD_WRITE, 4096, 512, proto.CMD_FLAG_FUA) + b"\xab" * 512
                       + req(proto.CMD_WRITE_ZEROES, 0, 8192, proto.CMD_FLAG_NO_HOLE)
                       + req(proto.CMD_TRIM, 65536, 65536) + req(proto.CMD_FLUSH, 0, 0)
                       + req(proto.CMD_CACHE, 0, 4096) + req(proto.CMD_BLOCK_STATUS, 0, 1 << 20)
                       + req(proto.CMD_READ, 1 << 19, 4096, proto.CMD_FLAG_DF))
    out.append(hello + proto.pack_option(proto.OPT_LIST) + proto.pack_option(
        proto.OPT_LIST_META_CONTEXT, proto.pack_meta_request("w", ("qemu:",)))
        + proto.pack_option(proto.OPT_INFO, proto.pack_info_request("w", (0, 1, 2, 3)))
        + proto.pack_option(proto.OPT_ABORT))
    out.append(hello + proto.pack_option(proto.OPT_EXPORT_NAME, b"r") + req(proto.CMD_READ))
    rnd = random.Random(1)
    return out + [nbd_case(rnd, 1 << 20)[:MAX_LEN["nbd"]] for _ in range(30)]


def qcow2_seeds(tmp: Path) -> list[bytes]:
    out = []
    for i, (opts, cmds) in enumerate([
            ("cluster_size=512", ["write -P 1 0 3k", "write -z 8k 2k", "write -P 3 20k 1k"]),
            ("cluster_size=512,compat=0.10", ["write -P 1 0 2k"]),
            ("cluster_size=512,refcount_bits=1", ["write -P 1 1k 2k", "discard 1k 512"]),
            ("cluster_size=512,lazy_refcounts=on", ["write -P 7 4k 1k"])]):
        path = tmp / f"seed{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "64k"],
                       check=True)
        for cmd in cmds:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True,
                           capture_output=True)
        if i == 0:
            subprocess.run(["qemu-img", "snapshot", "-c", "s", str(path)], check=True)
            subprocess.run(["qemu-img", "bitmap", "--add", str(path), "bm"], check=True)
        out.append(path.read_bytes())
    return out


# -- the parent: one worker per target, libFuzzer's output read back ---------------------------
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_LINE = re.compile(r"^#(\d+)\s+(INITED|DONE)\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)


@contextlib.contextmanager
def mounted(work: Path):
    """WORK as a fresh tmpfs of :data:`WORK_SIZE` for the block."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={WORK_SIZE},mode=0700", "tmpfs",
                    str(work)], check=True)
    try:
        yield work
    finally:
        for _try in range(20):          # the worker's last threads may still hold it a moment
            if subprocess.run(["umount", str(work)], check=False).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "--lazy", str(work)], check=False)


def run_target(target: str, runs: int, seed: int, work: Path, keep: str | None) -> dict:
    with mounted(work):
        res = _run_target(target, runs, seed, work)
        if keep:
            for name in ("corpus", "artifacts"):    # (not the sparse images: they can be huge)
                shutil.copytree(work / name, Path(keep) / target / name, dirs_exist_ok=True)
        return res


def _run_target(target: str, runs: int, seed: int, work: Path) -> dict:
    (work / "corpus").mkdir()
    (work / "artifacts").mkdir()
    seeds = {"qmp": qmp_seeds, "nbd": nbd_seeds}.get(target, lambda: qcow2_seeds(work))()
    for i, data in enumerate(seeds):
        (work / "corpus" / f"seed-{i:03d}").write_bytes(data)
    tokens = {"qmp": qmp_dict, "nbd": nbd_dict}.get(target, lambda: [b"QFI\xfb"])()
    (work / "dict").write_text("".join(_dict_line(t) + "\n" for t in tokens))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", target,
                           "--runs", str(runs), "--seed", str(seed), "--work", str(work)],
                          capture_output=True, text=True, errors="replace", check=False,
                          stdin=subprocess.DEVNULL, timeout=7200)
    secs = time.monotonic() - t0
    log = proc.stderr
    stats = {k: int(v) for k, v in _STAT.findall(log)}
    marks = {kind: dict(zip(("cov", "ft", "corpus"), map(int, rest)))
             for _n, kind, *rest in _LINE.findall(log)}
    res = {"runs": stats.get("number_of_executed_units"), "seconds": round(secs, 1),
           "exec_per_s": stats.get("average_exec_per_sec"), "seeds": len(seeds),
           "after_seeds": marks.get("INITED"), "at_end": marks.get("DONE"),
           "new_units": stats.get("new_units_added"), "peak_rss_mb": stats.get("peak_rss_mb"),
           "exit_code": proc.returncode, "findings": []}
    for path in sorted((work / "artifacts").iterdir()):
        res["findings"].append({"artifact": path.name, "input_hex": path.read_bytes()[:4000].hex(),
                                "log": log[log.find("FINDING:"):][:6000]})
    if proc.returncode != 0 and not res["findings"]:
        res["findings"].append({"artifact": None, "log": log[-6000:]})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="all", choices=[*TARGETS, "all"])
    ap.add_argument("--runs", type=int, default=100000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--keep", help="keep each target's corpus and artifacts under this directory")
    ap.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--replay", nargs="+", metavar="FILE",
                    help="run these inputs once each through --target (no libFuzzer): "
                         "reproduce a finding")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.runs, a.seed, Path(a.work), a.replay)
    sys.path.insert(0, str(HERE))
    if a.replay:
        if a.target == "all":
            ap.error("--replay needs one --target")
        work = Path(tempfile.mkdtemp(prefix="blockd-fuzzcov-"))
        try:
            with mounted(work):
                return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                       a.target, "--work", str(work), "--replay",
                                       *map(os.path.abspath, a.replay)], check=False).returncode
        finally:
            shutil.rmtree(work, ignore_errors=True)
    targets = list(TARGETS) if a.target == "all" else [a.target]
    result = {"seed": a.seed, "runs_asked": a.runs, "targets": {}}
    if os.geteuid() != 0:
        print("fuzz_cov.py: needs root (it mounts a tmpfs and chroots into it, so that "
              "fuzzed paths cannot reach this machine's files)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="blockd-fuzzcov-"))
    try:
        for target in targets:
            result["targets"][target] = run_target(target, a.runs, a.seed, tmp / target, a.keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 1 if any(t["findings"] for t in result["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
