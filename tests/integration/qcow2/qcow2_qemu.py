"""qemu-img/qemu-io wrappers for the qcow2 acceptance tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

from helpers import qemu_img, qemu_io

MiB = 1 << 20
#: Bigger loops on request.
LONG = os.environ.get("BLOCKD_QCOW2_LONG", "").lower() in ("1", "true", "yes", "on")


def create(path, size: int, *opts: str, backing: "str | None" = None,
           backing_fmt: "str | None" = None) -> Path:
    """``qemu-img create -f qcow2``."""
    argv: List[str] = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(opts)]
    if backing:
        argv += ["-b", backing]
        if backing_fmt:
            argv += ["-F", backing_fmt]
    qemu_img(*argv, str(path), str(size))
    return Path(path)


def io(path, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands on an image."""
    qemu_io(str(path), *commands, fmt=fmt)


def to_raw(path, fmt: str = "qcow2", snapshot: "str | None" = None) -> bytes:
    """The image's guest content as QEMU sees it (``qemu-img convert -O raw``)."""
    out = str(path) + ".qemu-view.raw"
    argv = ["convert", "-U", "-f", fmt, "-O", "raw"]
    if snapshot:
        argv += ["-l", "snapshot.name=" + snapshot]
    qemu_img(*argv, str(path), out)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def check(path) -> Dict:
    """``qemu-img check --output=json`` (exit status 0-3 allowed)."""
    res = qemu_img("check", "--output=json", str(path), check=False)
    assert res.returncode in (0, 1, 2, 3), res.stderr
    try:
        out = json.loads(res.stdout)
    except ValueError:
        raise AssertionError("qemu-img check failed: %s %s" % (res.stdout, res.stderr)) from None
    out["stderr"] = res.stderr
    out["rc"] = res.returncode
    return out


def assert_clean(path) -> Dict:
    """qemu-img check reports no corruption, no leak, no error."""
    res = check(path)
    bad = {k: res.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert bad == {"corruptions": 0, "leaks": 0, "check-errors": 0}, res
    return res


def info(path) -> Dict:
    """``qemu-img info --output=json``."""
    return json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)


def qemu_map(path) -> List[Dict]:
    """``qemu-img map --output=json``."""
    return json.loads(qemu_img("map", "-U", "--output=json", str(path)).stdout)
