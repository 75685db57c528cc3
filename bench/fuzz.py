#!/usr/bin/env python3
"""Fuzz blockd: the QMP parser and dispatcher, the NBD handshake and request loop, qcow2.

    .venv/bin/python bench/fuzz.py --target all --cases 100000 --seed 1 [--json PATH]

- ``qmp``: every case is one QMP session on a real socket of a running blockd: greeting,
  ``qmp_capabilities``, the case, a ``query-version`` to resynchronise, end of input.
  Cases are random bytes, broken JSON (unbalanced, deep nesting, bad escapes, invalid
  UTF-8, huge numbers and strings) and, mostly, commands of blockd's own QMP schema with
  arguments generated from the schema and then mutated (wrong types, missing or unknown
  members, out-of-range numbers, odd strings).  Every reply must be a JSON object with
  ``return`` or ``error`` (class and desc), a well-formed command must be answered under
  its ``id``, and the session must end when the input ends.
- ``nbd``: every case is one hostile client connection to blockd's NBD server (unix
  socket) with a read-only and a writable export: mutated handshakes (flags, option magic,
  codes, lying lengths, names, meta contexts) and, after a valid handshake, mutated
  requests (magic, flags, commands, offsets past the end, huge lengths, truncated
  payloads).  The server must answer or close, never hang or die; a well-behaved libnbd
  client keeps working throughout; the read-only export never changes.
- ``qcow2``: tests/integration/qcow2/qcow2_fuzz.py damages copies of qemu-img-made images
  (metadata bit flips, random bytes, truncation) and opens them in blockd's qcow2 driver
  (``--qcow2-io`` adds reads and writes after each open).  Only clean refusals are allowed.

The engine runs with ``--cases`` per target; the result is printed as JSON (cases, rate,
findings with reproducers).  tests/integration/fuzz/ runs a seeded slice of each target.
"""

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "plugins" / "module_utils")]

from blockd.nbd import proto  # noqa: E402  pylint: disable=wrong-import-position
from helpers import DaemonFactory, MiB, make_raw_image, qemu_img, qemu_io  # noqa: E402  pylint: disable=wrong-import-position

#: Commands a fuzz case must not run: they end the daemon or create files where told.
UNSAFE = {"quit", "blockdev-create", "nbd-server-start", "blockdev-snapshot-sync",
          "transaction"}
ODD_STRINGS = ["", " ", "a" * 5000, "\u0000", "\ud7ff\u00e9", "../../etc/passwd", "#block001",
               "/dev/null", "%s%n", "node0", "n" * 128, "\n", "\"", "\\", "1e309"]
ODD_NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30,
               0.5, -0.0, 1e308]


# -- QMP ----------------------------------------------------------------------------------------
class SchemaGen:
    """Arguments for blockd's QMP commands, generated from its JSON schema, then mutated."""

    def __init__(self, rnd):
        schema = json.loads((REPO / "plugins/module_utils/blockd/qmp/schema.json").read_text())
        self.defs = schema["definitions"]
        self.commands = {k: v for k, v in schema["commands"].items() if k not in UNSAFE}
        self.rnd = rnd

    def value(self, sch, depth=0):
        rnd = self.rnd
        if depth > 6 or not isinstance(sch, dict):
            return rnd.choice([None, 0, "x", True])
        if "$ref" in sch:
            return self.value(self.defs.get(sch["$ref"].rsplit("/", 1)[-1], {}), depth + 1)
        for key in ("oneOf", "anyOf"):
            if key in sch:
                return self.value(rnd.choice(sch[key]), depth + 1)
        if "enum" in sch:
            return rnd.choice(sch["enum"])
        if "const" in sch:
            return sch["const"]
        kind = sch.get("type")
        if isinstance(kind, list):
            kind = rnd.choice(kind)
        if kind == "object" or "properties" in sch:
            props = sch.get("properties", {})
            req = set(sch.get("required", []))
            return {k: self.value(v, depth + 1) for k, v in props.items()
                    if k in req or rnd.random() < 0.3}
        if kind == "array":
            return [self.value(sch.get("items", {}), depth + 1) for _ in range(rnd.randrange(3))]
        if kind in ("integer", "number"):
            lo, hi = sch.get("minimum", 0), sch.get("maximum", 2 ** 20)
            return rnd.randint(int(lo), int(min(hi, lo + 2 ** 20)))
        if kind == "boolean":
            return rnd.random() < 0.5
        if kind == "string":
            return rnd.choice(["node0", "ro", "rw", "j0", "tg0", "b0", "x"])
        return None

    def mutate(self, obj, depth=0):
        rnd = self.rnd
        if isinstance(obj, dict) and obj and rnd.random() < 0.7:
            obj = dict(obj)
            key = rnd.choice(list(obj))
            op = rnd.random()
            if op < 0.25:
                del obj[key]
            elif op < 0.4:
                obj[rnd.choice(["bogus", key.upper(), key + "x", ""])] = obj.get(key)
            else:
                obj[key] = self.mutate(obj[key], depth + 1)
            return obj
        if isinstance(obj, list) and obj and rnd.random() < 0.5:
            obj = list(obj)
            i = rnd.randrange(len(obj))
            obj[i] = self.mutate(obj[i], depth + 1)
            return obj
        return rnd.choice([rnd.choice(ODD_STRINGS), rnd.choice(ODD_NUMBERS), None, True, [],
                           {}, [obj], {"a": obj}, str(obj)])

    def command(self, n):
        rnd = self.rnd
        if rnd.random() < 0.05:
            name = rnd.choice(["", "Query-version", "query_version", "x" * 300, "quit2",
                               "qmp_capabilities"])
            sch = {}
        else:
            name = rnd.choice(sorted(self.commands))
            sch = self.commands[name].get("args") or {}
        msg = {"execute": name, "id": n}
        args = self.value(sch)
        if rnd.random() < 0.8:
            args = self.mutate(args)
        if args or rnd.random() < 0.5:
            msg["arguments"] = args
        if rnd.random() < 0.05:
            msg[rnd.choice(["exec-oob", "control", "bogus"])] = msg.pop("execute")
        if rnd.random() < 0.03:
            msg["id"] = rnd.choice([None, [1], {"a": n}, "s" * 100])
        return msg


def broken_json(rnd):
    """Input that is not one well-formed JSON object."""
    pick = rnd.randrange(9)
    if pick == 0:
        return os.urandom(rnd.randrange(1, 300))
    if pick == 1:
        return b"[" * rnd.choice([10, 1025, 5000]) + b"]" * rnd.randrange(3)
    if pick == 2:
        return b'{"execute": "query-version", "arguments": ' + b"{" * 2000
    if pick == 3:
        return b'{"execute": "\\u' + os.urandom(4) + b'"}'
    if pick == 4:
        return b'{"execute": "query-version", "id": 1' + b"9" * rnd.choice([20, 400, 70000]) + b"}"
    if pick == 5:
        return b'{"execute": "' + b"\xff\xfe\xc0\xaf" * rnd.randrange(1, 50) + b'"}'
    if pick == 6:
        return rnd.choice([b"[]", b"1", b'"s"', b"null", b"{}", b'{"id": 3}', b"true"])
    if pick == 7:
        return b"{'execute': 'query-version'}"       # QEMU's single quotes
    return b'{"execute": "query-version"' + b", \"k\": 1" * rnd.randrange(1, 30)


def qmp_session(path, payload, timeout=10.0):
    """Greeting, capabilities, PAYLOAD, a resync command, EOF; the reply lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(b'{"execute": "qmp_capabilities"}\n' + payload +
                  b'\n{"execute": "query-version", "id": "resync"}\n')
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return data.splitlines()


def check_qmp_replies(lines, case_id):
    """Problems with the replies of one session (an empty list when they are all right)."""
    problems, ids = [], []
    for line in lines[1:]:                       # lines[0] is the greeting
        try:
            msg = json.loads(line)
        except ValueError:
            # An id too big for a double comes back as `inf`, as qemu-storage-daemon 7.2
            # writes it (its JSON formatter prints %.17g); kept on purpose, see bench/README.md.
            fixed = line.replace(b'"id": inf}', b'"id": Infinity}').replace(
                b'"id": -inf}', b'"id": -Infinity}')
            try:
                msg = json.loads(fixed)
            except ValueError:
                return ["reply is not JSON: %r" % line[:200]]
        if not isinstance(msg, dict):
            return ["reply is not an object: %r" % line[:200]]
        if "event" in msg:
            continue
        if "return" not in msg and not (isinstance(msg.get("error"), dict)
                                        and {"class", "desc"} <= set(msg["error"])):
            problems.append("malformed reply %r" % line[:200])
        ids.append(msg.get("id"))
    if case_id is not None and case_id not in ids:
        problems.append("no reply to id %r (replies: %r)" % (case_id, ids))
    return problems


def fuzz_qmp(factory, cases, seed, findings):
    rnd = random.Random(seed)
    gen = SchemaGen(rnd)
    d = factory("blockd", "--blockdev", "driver=null-co,node-name=node0,size=1048576",
                nbd=True, check_alive=False)
    path = str(d.dir / "qmp.sock")
    d.close_qmp()
    for n in range(cases):
        if rnd.random() < 0.2:
            payload, case_id = broken_json(rnd), None
        else:
            msg = gen.command(n)
            case_id = msg.get("id") if isinstance(msg.get("id"), int) and "execute" in msg \
                else None
            payload = json.dumps(msg).encode()
        try:
            problems = check_qmp_replies(qmp_session(path, payload), case_id)
        except OSError as exc:
            problems = ["session failed: %s" % exc]
        if problems or not d.alive():
            findings.append({"target": "qmp", "case": n, "input": payload[:4000].decode(
                "latin-1"), "problems": problems, "alive": d.alive()})
            if not d.alive():
                return n + 1
    return cases


# -- NBD ----------------------------------------------------------------------------------------
def rand_option(rnd, names):
    code = rnd.choice([proto.OPT_GO, proto.OPT_INFO, proto.OPT_LIST, proto.OPT_EXPORT_NAME,
                       proto.OPT_STRUCTURED_REPLY, proto.OPT_SET_META_CONTEXT,
                       proto.OPT_LIST_META_CONTEXT, proto.OPT_STARTTLS, proto.OPT_ABORT,
                       proto.OPT_EXTENDED_HEADERS, rnd.randrange(2 ** 32)])
    name = rnd.choice(names)
    if code in (proto.OPT_GO, proto.OPT_INFO):
        data = proto.pack_info_request(name, tuple(rnd.randrange(6) for _ in range(
            rnd.randrange(4))))
    elif code in (proto.OPT_SET_META_CONTEXT, proto.OPT_LIST_META_CONTEXT):
        data = proto.pack_meta_request(name, tuple(rnd.choice(
            ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:", "", "x" * 300,
             "qemu:allocation-depth"]) for _ in range(rnd.randrange(4))))
    elif code == proto.OPT_EXPORT_NAME:
        data = name.encode()
    else:
        data = os.urandom(rnd.choice([0, 0, 4, 17]))
    if rnd.random() < 0.3:
        data = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        data = bytes(data)
    length = len(data)
    if rnd.random() < 0.15:
        length = rnd.choice([0, length + 1, max(0, length - 1), 2 ** 32 - 1, 4097, 65536])
    magic = proto.IHAVEOPT if rnd.random() > 0.03 else rnd.randrange(2 ** 64)
    return struct.pack(">QII", magic, code, length) + data, code


PAYLOAD = os.urandom(MiB)


def rand_request(rnd, size):
    cmd = rnd.choice([proto.CMD_READ, proto.CMD_WRITE, proto.CMD_FLUSH, proto.CMD_TRIM,
                      proto.CMD_CACHE, proto.CMD_WRITE_ZEROES, proto.CMD_BLOCK_STATUS,
                      proto.CMD_READ, proto.CMD_WRITE, proto.CMD_RESIZE, proto.CMD_DISC,
                      rnd.randrange(2 ** 16)])
    offset = rnd.choice([0, rnd.randrange(size), size - 1, size, size + 512, 2 ** 63 - 1,
                         2 ** 64 - 512, rnd.randrange(2 ** 64)])
    length = rnd.choice([0, 1, 512, 4096, rnd.randrange(1, 65536), 32 * MiB, 32 * MiB + 1,
                         2 ** 32 - 1])
    flags = rnd.choice([0, 0, proto.CMD_FLAG_FUA, proto.CMD_FLAG_DF, proto.CMD_FLAG_REQ_ONE,
                        proto.CMD_FLAG_FAST_ZERO, proto.CMD_FLAG_NO_HOLE,
                        proto.CMD_FLAG_PAYLOAD_LEN, rnd.randrange(2 ** 16)])
    magic = proto.REQUEST_MAGIC if rnd.random() > 0.03 else rnd.randrange(2 ** 32)
    req = struct.pack(">IHHQQI", magic, flags, cmd, rnd.randrange(2 ** 64), offset, length)
    if cmd == proto.CMD_WRITE:         # the payload: whole, none or cut short
        n = min(length, rnd.choice([length, 0, 100, 70000]))
        req += PAYLOAD[:n] if n <= len(PAYLOAD) or rnd.random() < 0.9 else PAYLOAD * 2
    return req


def nbd_case(rnd, size):
    """The bytes one hostile client sends."""
    names = ["ro", "rw", "", "nope", "r", "ro\0", "x" * 5000]
    flags = proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES
    if rnd.random() < 0.1:
        flags = rnd.choice([proto.FLAG_C_FIXED_NEWSTYLE, 0, rnd.randrange(2 ** 32)])
    out = struct.pack(">I", flags)
    if rnd.random() < 0.5:
        for _ in range(rnd.randrange(1, 6)):
            opt, code = rand_option(rnd, names)
            out += opt
            if code in (proto.OPT_EXPORT_NAME, proto.OPT_ABORT):
                return out
        if rnd.random() < 0.4:
            return out
    if rnd.random() < 0.5:
        out += proto.pack_option(proto.OPT_STRUCTURED_REPLY)
    out += proto.pack_option(proto.OPT_GO, proto.pack_info_request(rnd.choice(["ro", "rw"])))
    for _ in range(rnd.randrange(1, 8)):
        out += rand_request(rnd, size)
    return out


def nbd_session(path, payload, timeout=10.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    got = 0
    try:
        s.connect(path)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                         # the server hung up on us: allowed
        while True:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += len(chunk)
    finally:
        s.close()
    return got


def good_client(uri, image):
    """None if libnbd reads the first 64 KiB of IMAGE through URI, else the problem."""
    import nbd  # pylint: disable=import-outside-toplevel
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        if h.pread(65536, 0) != image.read_bytes()[:65536]:
            return "a good client read wrong data afterwards"
        h.shutdown()
    except nbd.Error as exc:
        return "a good client failed afterwards: %s" % exc
    return None


def fuzz_nbd(factory, cases, seed, findings, workdir):
    import hashlib  # pylint: disable=import-outside-toplevel
    rnd = random.Random(seed)
    size = MiB
    ro = make_raw_image(workdir / "ro.img", size, fill="random")
    rw = make_raw_image(workdir / "rw.img", size)
    digest = hashlib.sha256(ro.read_bytes()).hexdigest()
    d = factory("blockd", "--blockdev", f"driver=file,node-name=fro,filename={ro},read-only=on",
                "--blockdev", f"driver=file,node-name=frw,filename={rw}",
                "--export", "type=nbd,id=ro,node-name=fro,name=ro",
                "--export", "type=nbd,id=rw,node-name=frw,name=rw,writable=on",
                nbd=True, check_alive=False)
    path = d.nbd_socket
    rss = []
    for n in range(cases):
        payload = nbd_case(rnd, size)
        try:
            nbd_session(path, payload)
            problem = None
        except socket.timeout:
            problem = "the server neither answered nor closed within 10 s"
        except OSError as exc:
            problem = "connection failed: %s" % exc
        if n % 1000 == 999:
            rss.append(int(next(line.split()[1] for line in
                                Path(f"/proc/{d.pid}/status").read_text().splitlines()
                                if line.startswith("VmRSS:"))))
            problem = problem or good_client(d.nbd_uri("ro"), ro)
        if problem or not d.alive():
            findings.append({"target": "nbd", "case": n, "input": payload[:4000].hex(),
                             "problems": [problem] if problem else [], "alive": d.alive()})
            if not d.alive():
                return n + 1, rss
    d.quit()
    if hashlib.sha256(ro.read_bytes()).hexdigest() != digest:
        findings.append({"target": "nbd", "case": None, "problems": ["read-only export changed"]})
    return cases, rss


# -- qcow2 --------------------------------------------------------------------------------------
def fuzz_qcow2(cases, seed, findings, workdir, io):
    images = []
    for i, (opts, cmds) in enumerate([
            (("cluster_size=4096",), ("write -P 1 0 1M", "write -z 2M 1M", "write -P 3 5M 100k")),
            (("cluster_size=512", "compat=0.10"), ("write -P 1 0 300k", "write -P 2 2M 64k")),
            (("refcount_bits=1",), ("write -P 1 64k 1M", "discard 128k 64k"))]):
        path = workdir / f"f{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", ",".join(opts), str(path), "8M")
        qemu_io(str(path), *cmds, fmt="qcow2")
        images.append(str(path))
    qemu_img("snapshot", "-c", "s", images[0])
    qemu_img("bitmap", "--add", images[0], "bm")
    env = dict(os.environ, QCOW2_FUZZ_SEED_BASE=str(seed * 10 ** 7),
               QCOW2_FUZZ_LIGHT="0" if io else "1")
    proc = subprocess.run([sys.executable, str(REPO / "tests/integration/qcow2/qcow2_fuzz.py"),
                           str(cases), str(workdir / "work.qcow2")] + images, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        findings.append({"target": "qcow2", "problems": [proc.stderr[-3000:]]})
        return 0, {}
    summary = json.loads(proc.stdout.splitlines()[-1])
    for bad in summary.pop("bad"):
        findings.append({"target": "qcow2", "problems": [bad]})
    return cases, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="all", choices=["qmp", "nbd", "qcow2", "all"])
    ap.add_argument("--cases", type=int, default=100000, help="cases per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qcow2-io", action="store_true", help="qcow2: I/O after each open")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args()
    targets = ["qmp", "nbd", "qcow2"] if a.target == "all" else [a.target]
    result = {"seed": a.seed, "targets": {}, "findings": []}
    with tempfile.TemporaryDirectory(prefix="blockd-fuzz-", dir="/dev/shm") as tmp:
        tmp = Path(tmp)
        factory = DaemonFactory(tmp)
        try:
            for target in targets:
                t0 = time.monotonic()
                extra = {}
                if target == "qmp":
                    done = fuzz_qmp(factory, a.cases, a.seed, result["findings"])
                elif target == "nbd":
                    done, rss = fuzz_nbd(factory, a.cases, a.seed, result["findings"], tmp)
                    extra["engine_rss_kib_every_1000"] = rss
                else:
                    done, extra = fuzz_qcow2(a.cases, a.seed, result["findings"], tmp,
                                             a.qcow2_io)
                secs = time.monotonic() - t0
                result["targets"][target] = dict(cases=done, seconds=round(secs, 1),
                                                 cases_per_s=round(done / secs, 1), **extra)
        finally:
            factory.finish()
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
