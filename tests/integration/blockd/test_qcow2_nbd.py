"""qcow2 through the daemon: images qemu-img made, read, written and mapped over NBD.

Run on qsd and blockd alike (the qsd cases prove the expectations), with the
qsd command line ``--blockdev driver=qcow2,node-name=q,file.driver=file,...``
and ``--export type=nbd,...``:

* images made by qemu-img (cluster sizes 4 KiB to 2 MiB, compat=0.10,
  ``convert -c``, preallocation=metadata, a 3-deep backing chain) read back
  equal to qemu-img's own view (``qemu-img compare``);
* thousands of random writes, unaligned writes, zero writes and trims through
  a writable export leave an image that ``qemu-img check`` finds clean and that
  equals a raw shadow copy;
* ``nbdinfo --map`` and ``--map=qemu:allocation-depth`` agree with
  ``qemu-img map``;
* ``blockdev-create`` makes the same qcow2 and raw images on both engines.
"""

import json
import os
import random

import pytest

from helpers import MiB, qemu_img, run

SIZE = 64 * MiB
HOLE, ZERO = 1, 2   # NBD_STATE_*


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(args + [str(path)])


def create(path, *opts, size=SIZE, backing=None):
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", str(backing), "-F", "qcow2"]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, path, str(size))
    return path


def fill(path, seed, ops=40, size=SIZE):
    """Random patterned writes, zero writes and discards with qemu-io."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(ops):
        off = rng.randrange(0, size - 1)
        n = rng.randint(1, min(3 * MiB, size - off))
        kind = rng.random()
        if kind < 0.7:
            cmds.append("write -P %d %d %d" % (rng.randint(1, 255), off, n))
        elif kind < 0.85:
            off, n = off // 512 * 512, max(512, n // 512 * 512)
            cmds.append("write -z %d %d" % (off, min(n, size - off)))
        else:
            cmds.append("discard %d %d" % (off, n))
    qemu_io(path, *cmds)


def serve(daemon, engine, path, *export_opts, writable=False, node_opts=""):
    export = "type=nbd,id=e0,node-name=q,name=q" + ("".join("," + o for o in export_opts))
    if writable:
        export += ",writable=on"
    d = daemon(engine, "--blockdev",
               f"driver=qcow2,node-name=q{node_opts},file.driver=file,file.filename={path}",
               "--export", export, nbd=True)
    return d, d.nbd_uri("q")


def compare_with_qemu(path, uri):
    run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(path), uri])


# --- reading images qemu-img made -------------------------------------------------------------

@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
def test_cluster_sizes(daemon, engine, tmp_path, cluster):
    path = create(tmp_path / "c.qcow2", f"cluster_size={cluster}")
    fill(path, cluster)
    _d, uri = serve(daemon, engine, path)
    compare_with_qemu(path, uri)


@pytest.mark.parametrize("variant", ["compat010", "compressed", "prealloc-metadata"])
def test_image_variants(daemon, engine, tmp_path, variant):
    if variant == "compat010":
        path = create(tmp_path / "v2.qcow2", "compat=0.10")
        fill(path, 7)
    elif variant == "compressed":
        src = create(tmp_path / "src.qcow2")
        fill(src, 8)
        path = tmp_path / "c.qcow2"
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, path)
    else:
        path = create(tmp_path / "p.qcow2", "preallocation=metadata")
        fill(path, 9, ops=10)
    _d, uri = serve(daemon, engine, path)
    compare_with_qemu(path, uri)


def chain(tmp_path):
    """base <- mid <- top, each layer with its own data, zero clusters and holes."""
    base = create(tmp_path / "base.qcow2")
    qemu_io(base, "write -P 1 0 8M", "write -P 1 16M 4M", "write -z 18M 1M")
    mid = create(tmp_path / "mid.qcow2", backing=base)
    qemu_io(mid, "write -P 2 4M 2M", "write -z 6M 1M", "write -P 2 30M 64K",
            "write -P 2 40M 3000")
    top = create(tmp_path / "top.qcow2", backing=mid)
    qemu_io(top, "write -P 3 5M 512K", "write -z 0 64K", "write -P 3 63M 1M",
            "write -P 3 32M 4K", "write -z 16M 512K")
    return top


def test_backing_chain(daemon, engine, tmp_path):
    top = chain(tmp_path)
    d, uri = serve(daemon, engine, top)
    compare_with_qemu(top, uri)
    depth = {n["node-name"]: n["backing_file_depth"] for n in d.qmp.cmd("query-named-block-nodes")}
    assert depth["q"] == 2


# --- block status ---------------------------------------------------------------------------

def _runs(extents):
    """[(start, end, value)] from ``(start, length, value)`` extents, equal neighbours merged."""
    out = []
    for start, length, value in extents:
        if out and out[-1][2] == value and out[-1][1] == start:
            out[-1] = (out[-1][0], start + length, value)
        else:
            out.append((start, start + length, value))
    return out


def nbd_map(uri, context=None):
    arg = "--map" if context is None else "--map=" + context
    ext = json.loads(run(["nbdinfo", arg, "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in ext]


def qemu_map(path):
    return json.loads(qemu_img("map", "-U", "--output=json", path).stdout)


@pytest.mark.parametrize("image", ["chain", "prealloc-metadata"])
def test_block_status_matches_qemu_img_map(daemon, engine, tmp_path, image):
    if image == "chain":
        path = chain(tmp_path)
    else:
        path = create(tmp_path / "p.qcow2", "preallocation=metadata")
        qemu_io(path, "write -P 1 1M 3M", "write -z 8M 1M", "write -P 2 20M 4K")
    _d, uri = serve(daemon, engine, path, "allocation-depth=on")
    qmap = qemu_map(path)
    expect = _runs([(e["start"], e["length"],
                     (0 if e["data"] else HOLE) | (ZERO if e["zero"] else 0)) for e in qmap])
    assert _runs(nbd_map(uri)) == expect
    # qemu:allocation-depth: 0 absent, 1 this image, 2 its backing file...
    expect = _runs([(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0)
                    for e in qmap])
    assert _runs(nbd_map(uri, "qemu:allocation-depth")) == expect


# --- random I/O through a writable export -------------------------------------------------------

def random_io(h, nbd, shadow, rng, ops, cluster, unmap):
    size = len(shadow)
    for i in range(ops):
        kind = rng.random()
        off = rng.randrange(0, size - 1)
        if kind < 0.45:       # unaligned write (sometimes FUA)
            n = rng.randint(1, min(300 * 1024, size - off))
            data = rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            shadow[off:off + n] = data
        elif kind < 0.65:     # aligned overwrite of whole clusters
            off = off // cluster * cluster
            n = min(cluster * rng.randint(1, 4), size - off)
            data = bytes([rng.randint(0, 255)]) * n
            h.pwrite(data, off)
            shadow[off:off + n] = data
        elif kind < 0.8:      # zero write, may punch holes or not
            n = rng.randint(1, min(2 * MiB, size - off))
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
            shadow[off:off + n] = bytes(n)
        elif kind < 0.92:     # trim: whole clusters only, and only with discard=unmap
            n = rng.randint(1, min(max(2 * MiB, 3 * cluster), size - off))
            h.trim(n, off)
            if unmap:
                start = -(-off // cluster) * cluster
                end = (off + n) // cluster * cluster
                if end > start:
                    shadow[start:end] = bytes(end - start)
        elif kind < 0.97:     # read back
            n = rng.randint(1, min(MiB, size - off))
            assert h.pread(n, off) == bytes(shadow[off:off + n]), (i, off, n)
        else:
            h.flush()


@pytest.mark.parametrize("seed,cluster,unmap", [(1, 65536, False), (2, 65536, True),
                                                (3, 4096, True), (4, 2 * MiB, True)])
def test_random_io_keeps_image_consistent(daemon, engine, tmp_path, libnbd, seed, cluster,
                                          unmap):
    nbd = libnbd
    path = create(tmp_path / "rw.qcow2", f"cluster_size={cluster}", size=32 * MiB)
    qemu_io(path, "write -P 0x77 0 5M")
    shadow = bytearray(b"\x77" * (5 * MiB) + bytes(27 * MiB))
    d, uri = serve(daemon, engine, path, writable=True,
                   node_opts=",discard=unmap" if unmap else "")
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        random_io(h, nbd, shadow, random.Random(seed), 2500, cluster, unmap)
        h.flush()
    finally:
        h.shutdown()
    assert d.quit() == 0
    out = qemu_img("check", "-f", "qcow2", path).stdout
    assert "No errors were found on the image." in out and "leaked" not in out, out
    raw = tmp_path / "shadow.raw"
    raw.write_bytes(shadow)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("discard", ["", ",discard=unmap"])
def test_trim_needs_discard_unmap(daemon, engine, tmp_path, fmt, discard):
    """QEMU ignores discards on a node without discard=unmap (its inline file inherits it)."""
    path = tmp_path / "d.img"
    qemu_img("create", "-q", "-f", fmt, path, "4M")
    d = daemon(engine, "--blockdev", f"driver={fmt}{discard},node-name=q,file.driver=file,"
                                     f"file.filename={path}",
               "--export", "type=nbd,id=e0,node-name=q,name=q,writable=on", nbd=True)
    uri = d.nbd_uri("q")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", "-c", "discard 0 2M", uri])
    expect = "0" if discard else "0x11"
    run(["qemu-io", "-f", "raw", "-c", f"read -P {expect} 0 2M", "-c", "read -P 0x11 2M 2M", uri])
    d.quit()
    allocated = os.stat(path).st_blocks * 512
    assert (allocated < 3 * MiB) == bool(discard), allocated


# --- blockdev-create: the same images on both engines -------------------------------------

CREATE_VARIANTS = {
    "default": {},
    "v2": {"version": "v2"},
    "4k": {"cluster-size": 4096},
    "2m": {"cluster-size": 2 * MiB},
    "lazy": {"lazy-refcounts": True},
    "refcount1": {"refcount-bits": 1},
    "refcount64": {"refcount-bits": 64},
    "backing": {"backing-file": "base.qcow2", "backing-fmt": "qcow2"},
    "metadata": {"preallocation": "metadata"},
    "falloc": {"preallocation": "falloc"},
    "full": {"preallocation": "full"},
}


def _create_with(daemon, engine, path, options):
    path.write_bytes(b"")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={path}")
    d.qmp.cmd("blockdev-create", **{"job-id": "c", "options": dict(
        {"driver": "qcow2", "file": "f0", "size": 48 * MiB}, **options)})
    ev = d.qmp.event_wait("JOB_STATUS_CHANGE", timeout=60,
                          match={"data": {"id": "c", "status": "concluded"}})
    assert ev and "error" not in d.qmp.cmd("query-jobs")[0]
    d.quit()


def _info(path):
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    for key in ("filename", "actual-size", "full-backing-filename"):
        info.pop(key, None)
    return info


@pytest.mark.parametrize("variant", sorted(CREATE_VARIANTS))
def test_blockdev_create_qcow2_like_qsd(daemon, tmp_path, variant):
    options = CREATE_VARIANTS[variant]
    create(tmp_path / "base.qcow2")
    made = {}
    for engine in ("qsd", "blockd"):
        path = tmp_path / f"{engine}.qcow2"
        _create_with(daemon, engine, path, options)
        out = qemu_img("check", "-f", "qcow2", path).stdout
        assert "No errors were found on the image." in out, (engine, out)
        made[engine] = path
    assert _info(made["blockd"]) == _info(made["qsd"])
    assert qemu_map(made["blockd"]) == qemu_map(made["qsd"])
    assert os.path.getsize(made["blockd"]) == os.path.getsize(made["qsd"])
    if variant not in ("falloc", "full"):
        # the very same bytes: header, refcount table and blocks, L1 table
        assert made["blockd"].read_bytes() == made["qsd"].read_bytes()


def test_blockdev_create_raw_like_qsd(daemon, tmp_path):
    """A raw image is a file created by driver=file; both engines give the same."""
    for engine in ("qsd", "blockd"):
        path = tmp_path / f"{engine}.raw"
        d = daemon(engine)
        d.qmp.cmd("blockdev-create", **{"job-id": "c", "options": {
            "driver": "file", "filename": str(path), "size": 10 * MiB + 512}})
        d.qmp.event_wait("JOB_STATUS_CHANGE", timeout=60,
                         match={"data": {"id": "c", "status": "concluded"}})
        d.quit()
        info = json.loads(qemu_img("info", "--output=json", "-f", "raw", path).stdout)
        assert info["virtual-size"] == 10 * MiB + 512 and info["format"] == "raw"
        assert path.read_bytes() == bytes(10 * MiB + 512)
