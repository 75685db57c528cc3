"""A disk writer that proves point-in-time backups, and its checker.

``write`` keeps writing stamped 64 KiB blocks to an NBD export (python3-libnbd),
from N writer threads, each over its own connection, each in its own fixed
order of blocks, round and round, until it gets SIGTERM/SIGINT.  Every block
a writer puts down says who wrote it and which of its writes it was
(``writer W write SEQ``), so an image tells which writes it holds.  The
writer keeps a status file (JSON, replaced atomically a few times a second
and once more at exit) with the number of writes each writer has completed::

    {"pid": 123, "running": true, "size": 67108864, "block": 65536,
     "interval": 0.01, "writers": [{"index": 0, "done": 812}, ...]}

``check`` compares a raw image (a backup restored to raw, or pulled raw) with
the original disk: for every writer the image must hold exactly the first n
of its writes (n read from the image; a later write without an earlier one is
"not a point in time") and nothing else may differ from the original, byte for
byte.  With ``--before`` (a status read before the backup started) and
``--after`` (one read after it ended) n must also lie between the writes done
before and the writes started by then.  It prints one line of JSON
(``ok``, ``writes``, ``sha256``...) and exits 0, or 1 with ``error``.

Used by scripts/demo, the playbook tests and the molecule scenario::

    python3 scripts/pit_writer.py write --uri 'nbd+unix:///disk0?socket=/run/blockd/nbd.sock' \\
        --status /tmp/w.json --writers 3 &
    python3 scripts/pit_writer.py status /tmp/w.json > before.json
    ... back the disk up, restore it to restored.raw ...
    python3 scripts/pit_writer.py status /tmp/w.json > after.json
    python3 scripts/pit_writer.py check --original original.raw --image restored.raw \\
        --status /tmp/w.json --before before.json --after after.json

Standard library + python3-libnbd (``write`` only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

BLOCK = 64 * 1024


def stamp(writer: int, seq: int) -> bytes:
    """The 64 KiB writer WRITER puts down in its SEQ-th write: recognisable, never all zero."""
    head = f"writer {writer} write {seq:06d}\n".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def parse_stamp(data: bytes) -> Optional[tuple]:
    """``(writer, seq)`` when DATA is exactly some stamp, else None."""
    if not data.startswith(b"writer "):
        return None
    head = data.split(b"\n", 1)[0].split()
    if len(head) != 4 or head[2] != b"write":
        return None
    try:
        writer, seq = int(head[1]), int(head[3])
    except ValueError:
        return None
    return (writer, seq) if data == stamp(writer, seq) else None


def writer_blocks(writer: int, writers: int, size: int, start: int = 0,
                  span: Optional[int] = None) -> List[int]:
    """The blocks writer WRITER visits, in order: its share of the disk (or of
    ``[start, start + span)``), strided."""
    first = start // BLOCK
    end = size // BLOCK if span is None else min(size // BLOCK, (start + span) // BLOCK)
    mine = [b for b in range(first, end) if b % writers == writer]
    if not mine:
        return []
    # a stride coprime with the count visits every block once, out of order
    stride = next(s for s in (7, 11, 13, 17, 19, 23) if len(mine) % s)
    return [mine[(i * stride) % len(mine)] for i in range(len(mine))]


def block_of(blocks: Sequence[int], seq: int) -> int:
    """Where write SEQ goes: round and round the writer's blocks."""
    return blocks[seq % len(blocks)]


# -- status file ---------------------------------------------------------------------------

def write_json(path: Path, doc: dict) -> None:
    """Replace PATH with DOC atomically (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_status(path: Path) -> dict:
    """The status file at PATH."""
    return json.loads(Path(path).read_text())


# -- write ------------------------------------------------------------------------------------

class Writer(threading.Thread):
    """One writer: its own NBD connection, its own blocks, one write after the other."""

    def __init__(self, nbd_mod, uri: str, index: int, writers: int, size: int,
                 interval: float, stop: threading.Event, start: int = 0,
                 span: Optional[int] = None) -> None:
        super().__init__(daemon=True, name=f"writer-{index}")
        self.handle = nbd_mod.NBD()
        self.handle.connect_uri(uri)
        self.index = index
        self.blocks = writer_blocks(index, writers, size, start, span)
        self.interval, self.stop = interval, stop
        self.done = 0
        self.error: Optional[str] = None

    def run(self) -> None:
        try:
            seq = 0
            while not self.stop.is_set():
                self.handle.pwrite(stamp(self.index, seq), block_of(self.blocks, seq) * BLOCK)
                seq += 1
                self.done = seq
                if self.interval:
                    self.stop.wait(self.interval)
        except Exception as exc:  # noqa: BLE001 pylint: disable=broad-exception-caught
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                self.handle.shutdown()
            except Exception:  # noqa: BLE001 pylint: disable=broad-exception-caught
                pass


def cmd_write(args: argparse.Namespace) -> int:
    import nbd  # pylint: disable=import-outside-toplevel  (python3-libnbd)
    status = Path(args.status)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    probe = nbd.NBD()
    probe.connect_uri(args.uri)
    size = probe.get_size()
    probe.shutdown()
    span = args.span if args.span else size - args.start
    writers = [Writer(nbd, args.uri, i, args.writers, size, args.interval, stop,
                      args.start, span) for i in range(args.writers)]

    def doc(running: bool) -> dict:
        return {"pid": os.getpid(), "running": running, "uri": args.uri, "size": size,
                "block": BLOCK, "interval": args.interval, "start": args.start, "span": span,
                "writers": [{"index": w.index, "done": w.done, "error": w.error}
                            for w in writers]}

    for w in writers:
        w.start()
    while not stop.wait(0.1):
        write_json(status, doc(True))
        if any(w.error for w in writers) or not any(w.is_alive() for w in writers):
            break
    stop.set()
    for w in writers:
        w.join(60)
    write_json(status, doc(False))
    errors = [w.error for w in writers if w.error]
    if errors:
        print(f"pit_writer: {'; '.join(errors)}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(read_status(Path(args.status))))
    return 0


# -- check ------------------------------------------------------------------------------------

class NotAPointInTime(Exception):
    """The image is not the disk at one instant."""


def writes_in(image, writer: int, blocks: Sequence[int]) -> int:
    """How many writes of WRITER the open IMAGE holds (the highest sequence seen, plus one)."""
    top = -1
    for block in blocks:
        image.seek(block * BLOCK)
        found = parse_stamp(image.read(BLOCK))
        if found and found[0] == writer:
            top = max(top, found[1])
    return top + 1


def expected_blocks(writer: int, blocks: Sequence[int], count: int) -> Dict[int, bytes]:
    """Block -> content after the first COUNT writes of WRITER (blocks not written: absent)."""
    out: Dict[int, bytes] = {}
    for seq in range(max(0, count - len(blocks)), count):
        out[block_of(blocks, seq)] = stamp(writer, seq)
    return out


def check(original: Path, image: Path, writers: int,
          before: Optional[dict] = None, after: Optional[dict] = None,
          start: int = 0, span: Optional[int] = None) -> dict:
    """Check IMAGE is ORIGINAL plus a prefix of every writer's writes (see the module doc).

    The writers' area (START, SPAN) comes from BEFORE when given.

    :raise NotAPointInTime: naming the first block that shows it is not.
    """
    size = original.stat().st_size
    if image.stat().st_size != size:
        raise NotAPointInTime(f"{image} is {image.stat().st_size} bytes, the disk {size}")
    if before:
        start, span = before.get("start", 0), before.get("span")
    counts: List[int] = []
    want: Dict[int, bytes] = {}
    with open(image, "rb") as img:
        for w in range(writers):
            blocks = writer_blocks(w, writers, size, start, span)
            n = writes_in(img, w, blocks)
            counts.append(n)
            want.update(expected_blocks(w, blocks, n))
    digest = hashlib.sha256()
    with open(original, "rb") as orig, open(image, "rb") as img:
        for block in range(-(-size // BLOCK)):
            got = img.read(BLOCK)
            exp = orig.read(BLOCK)
            if block in want:
                exp = want[block]
            if got != exp:
                who = parse_stamp(got)
                what = (f"write {who[1]} of writer {who[0]}" if who else
                        "data no writer wrote" if block not in want else "the original data")
                raise NotAPointInTime(
                    f"block {block} (offset {block * BLOCK}) holds {what}, but the disk at the "
                    f"instant where the writers had done {counts} writes held "
                    + ("another write" if block in want else "its original data")
                    + ": not a point in time")
            digest.update(got)
    bounds = []
    for w, n in enumerate(counts):
        lo = before["writers"][w]["done"] if before else 0
        hi = after["writers"][w]["done"] + 1 if after else None
        bounds.append([lo, hi])
        if n < lo or (hi is not None and n > hi):
            raise NotAPointInTime(
                f"the image holds {n} writes of writer {w}, but {lo} were done before the "
                "backup started" + (f" and at most {hi} had started when it ended"
                                    if hi is not None else ""))
    return {"ok": True, "writes": counts, "bounds": bounds, "size": size,
            "sha256": digest.hexdigest()}


def cmd_check(args: argparse.Namespace) -> int:
    try:
        status = read_status(Path(args.status)) if args.status else None
        before = read_status(Path(args.before)) if args.before else None
        after = read_status(Path(args.after)) if args.after else None
    except (OSError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": f"unreadable writer status: {exc}"}))
        return 1
    known = status or before or after
    writers = args.writers or (len(known["writers"]) if known else 0)
    if not writers:
        print(json.dumps({"ok": False, "error": "give --writers, --status or --before"}))
        return 1
    try:
        result = check(Path(args.original), Path(args.image), writers, before, after)
    except (NotAPointInTime, OSError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    if status:
        result["writes_total"] = [w["done"] for w in status["writers"]]
    print(json.dumps(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write stamped blocks to an NBD export until SIGTERM")
    w.add_argument("--uri", required=True, help="NBD URI of a writable export")
    w.add_argument("--status", required=True, help="status file (JSON) to keep up to date")
    w.add_argument("--writers", type=int, default=3, help="writer threads (default 3)")
    w.add_argument("--start", type=int, default=0, help="first byte of the area written")
    w.add_argument("--span", type=int, default=0,
                   help="bytes of the area written (default: to the end of the disk)")
    w.add_argument("--interval", type=float, default=0.01,
                   help="pause after each write, seconds (default 0.01; 0 = flat out)")
    s = sub.add_parser("status", help="print the status file")
    s.add_argument("status")
    c = sub.add_parser("check", help="check an image is the disk at one instant")
    c.add_argument("--original", required=True, help="the disk before the writer started")
    c.add_argument("--image", required=True, help="the raw image to check (a restored backup)")
    c.add_argument("--status", help="the writer's status file (gives the writer count)")
    c.add_argument("--writers", type=int,
                   help="writer count (default: from --status, --before or --after)")
    c.add_argument("--before", help="a status read before the backup started")
    c.add_argument("--after", help="a status read after the backup ended")
    args = p.parse_args(argv)
    return {"write": cmd_write, "status": cmd_status, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
