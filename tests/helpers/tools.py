"""Running external tools from tests, and making disk images."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from .policy import require_tool

MiB = 1 << 20


def run(cmd: Sequence[str | os.PathLike], *, timeout: float = 120, check: bool = True,
        input: bytes | None = None, cwd: str | os.PathLike | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run CMD, capture stdout/stderr as text; on failure (CHECK) fail the test with both."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                              cwd=cwd, env=env, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(argv)}\n"
                    f"stdout: {_text(exc.stdout)}\nstderr: {_text(exc.stderr)}", pytrace=False)
    out = subprocess.CompletedProcess(argv, proc.returncode, _text(proc.stdout), _text(proc.stderr))
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(argv)}\n"
                    f"stdout: {out.stdout}\nstderr: {out.stderr}", pytrace=False)
    return out


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def make_raw_image(path: str | os.PathLike, size: int, fill: str | bytes | None = None) -> Path:
    """Create a raw image of SIZE bytes at PATH.

    FILL: None -> sparse zeroes; "random" -> random data; bytes -> that pattern
    repeated.  Returns the path.
    """
    path = Path(path)
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            block = (os.urandom(MiB) if fill == "random"
                     else (bytes(fill) * (MiB // len(fill) + 1))[:MiB])
            left = size
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return path


def qemu_img(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    """``qemu-img ARGS`` (qemu-utils)."""
    return run([require_tool("qemu-img", "qemu-utils"), *args], **kw)


def qemu_io(target: str | os.PathLike, *commands: str, fmt: str = "raw",
            **kw) -> subprocess.CompletedProcess:
    """``qemu-io -f FMT TARGET -c CMD...`` (target may be an nbd+unix:// URI)."""
    argv: list = [require_tool("qemu-io", "qemu-utils"), "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    return run([*argv, str(target)], **kw)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of SIZE (mount's syntax: ``5M``) on PATH for a full-disk test.

    The tests run as root (CI does); a failed mount fails the test, it never skips.
    Unmounted (lazily, so a daemon still holding a file cannot block it) on exit.
    """
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs on {path} for a full-disk test: {res.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def copy_cli(*args, python: str = sys.executable, check: int | None = None,
             timeout: float = 120) -> tuple[int, dict]:
    """Run nbd_copy's CLI (``python -m blockd.copy ARGS``) from this checkout.

    Returns (exit code, its one JSON line); CHECK asserts the exit code.  No
    ssh-agent is passed on, so SSH tests see only the keys they name.
    """
    from .daemon import MODULE_UTILS  # pylint: disable=import-outside-toplevel
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["PYTHONPATH"] = str(MODULE_UTILS)
    p = subprocess.run([python, "-m", "blockd.copy", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, (p.stdout, p.stderr)
    res = json.loads(lines[0])
    if check is not None:
        assert p.returncode == check, (p.returncode, res, p.stderr)
    return p.returncode, res
