"""Dirty bitmaps, run against qsd and blockd alike.

The block-dirty-bitmap-* replies and texts, the ``dirty-bitmaps`` of query-named-block-nodes,
counts after writes through an NBD export, persistence in qcow2 images (written by one
program, read by the other), the in-use flag left by a SIGKILL and transactions with bitmap
actions are all what qemu-storage-daemon 7.2 does (the qsd cases prove it).
"""

import json

from helpers import MiB, make_raw_image, qemu_img, qemu_io

K64 = 64 * 1024


def qok(q, cmd, **args):
    """Run CMD (whose arguments include ``name``), assert success, return the value."""
    reply = q.cmd_raw(cmd, args)
    assert "return" in reply, (cmd, args, reply)
    return reply["return"]


def qerr(q, cmd, **args):
    """Run CMD, assert it fails, return the error dict."""
    reply = q.cmd_raw(cmd, args)
    assert "error" in reply, (cmd, args, reply)
    return reply["error"]


def info(path):
    return json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)


def disk_bitmaps(path):
    return info(path)["format-specific"]["data"].get("bitmaps")


def check_clean(path):
    out = qemu_img("check", "-f", "qcow2", str(path)).stdout
    assert "No errors were found on the image." in out, out


def qcow2(path, size="4M", *opts):
    qemu_img("create", "-f", "qcow2", *opts, str(path), size)
    return path


def bitmaps(q, node):
    """The node's dirty-bitmaps member of query-named-block-nodes (None when absent)."""
    for n in q.cmd("query-named-block-nodes", flat=True):
        if n["node-name"] == node:
            return n.get("dirty-bitmaps")
    raise AssertionError(node)


def bm(name, count=0, granularity=K64, recording=True, persistent=False, busy=False, **extra):
    return {"name": name, "recording": recording, "persistent": persistent, "busy": busy,
            "granularity": granularity, "count": count, **extra}


def qcow2_args(path, node="q0", fnode="f0", extra=""):
    return ["--blockdev", f"driver=file,node-name={fnode},filename={path}",
            "--blockdev", f"driver=qcow2,node-name={node},file={fnode}{extra}"]


# --- commands and their texts ------------------------------------------------------------

def test_add_checks_and_query(daemon, engine, tmp_path):
    raw = make_raw_image(tmp_path / "r.raw", 4 * MiB)
    c4 = qcow2(tmp_path / "c4.qcow2", "4M", "-o", "cluster_size=4096")
    v2 = qcow2(tmp_path / "v2.qcow2", "4M", "-o", "compat=0.10")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={raw}",
               "--blockdev", "driver=raw,node-name=r0,file=f0",
               *qcow2_args(c4, "c4", "f4"), *qcow2_args(v2, "v2", "f2"))
    q = d.qmp
    aerr = lambda **a: qerr(q, "block-dirty-bitmap-add", **a)["desc"]  # noqa: E731
    assert aerr(node="r0", name="") == "Bitmap name cannot be empty"
    assert aerr(node="nope", name="a") == "Cannot find device='nope' nor node-name='nope'"
    assert aerr(node="r0", name="a", granularity=1000) == \
        "Granularity must be power of 2 and at least 512"
    assert aerr(node="r0", name="a", granularity=256) == \
        "Granularity must be power of 2 and at least 512"
    for bad in (1 << 32, -512):
        assert aerr(node="r0", name="a", granularity=bad) == \
            "Parameter 'granularity' expects uint32_t"
    assert aerr(node="r0", name="p", persistent=True) == \
        "Can't store persistent bitmaps to r0: Operation not supported"
    assert aerr(node="v2", name="p", persistent=True) == \
        "Can't make bitmap 'p' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"
    assert aerr(node="r0", name="x" * 1024) == "Bitmap name too long: " + "x" * 1024
    assert qok(q, "block-dirty-bitmap-add", node="r0", name="a", granularity=1 << 31) == {}
    assert qok(q, "block-dirty-bitmap-add", node="r0", name="b") == {}
    assert qok(q, "block-dirty-bitmap-add", node="f0", name="b") == {}
    assert aerr(node="r0", name="b") == "Bitmap already exists: b"
    assert qok(q, "block-dirty-bitmap-add", node="c4", name="b") == {}
    assert qok(q, "block-dirty-bitmap-add", node="c4", name="p", persistent=True,
                 granularity=512) == {}
    assert qok(q, "block-dirty-bitmap-add", node="c4", name="d", disabled=True) == {}
    # newest first; default granularity = cluster size clamped to [4K, 64K]
    assert bitmaps(q, "c4") == [bm("d", granularity=4096, recording=False),
                                bm("p", granularity=512, persistent=True),
                                bm("b", granularity=4096)]
    assert bitmaps(q, "r0") == [bm("b"), bm("a", granularity=1 << 31)]
    assert bitmaps(q, "f0") == [bm("b")]
    assert bitmaps(q, "f4") is None
    for cmd in ("remove", "clear", "enable", "disable"):
        assert qerr(q, "block-dirty-bitmap-" + cmd, node="c4", name="zz")["desc"] == \
            "Dirty bitmap 'zz' not found"
        assert qerr(q, "block-dirty-bitmap-" + cmd, node="zz", name="b")["desc"] == \
            "Node 'zz' not found"
    merr = lambda t, b: qerr(q, "block-dirty-bitmap-merge", node="c4", target=t,  # noqa: E731
                                bitmaps=b)["desc"]
    assert merr("zz", ["d"]) == "Dirty bitmap 'zz' not found"
    assert merr("d", ["b", "zz"]) == "Dirty bitmap 'zz' not found"
    assert merr("d", [{"node": "r0", "name": "zz"}]) == "Dirty bitmap 'zz' not found"
    assert merr("d", [{"node": "zz", "name": "b"}]) == "Node 'zz' not found"
    assert qok(q, "block-dirty-bitmap-merge", node="c4", target="d",
                 bitmaps=["b", {"node": "r0", "name": "a"}]) == {}
    for cmd in ("enable", "enable", "disable", "disable"):  # idempotent
        assert qok(q, "block-dirty-bitmap-" + cmd, node="c4", name="d") == {}
    assert qok(q, "block-dirty-bitmap-remove", node="c4", name="p") == {}
    assert qok(q, "block-dirty-bitmap-remove", node="r0", name="a") == {}
    assert [b["name"] for b in bitmaps(q, "c4")] == ["d", "b"]
    d.quit()
    assert disk_bitmaps(c4) is None       # p was removed before it was ever stored


def test_counts_after_nbd_writes(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "d.qcow2", "8M")
    raw = make_raw_image(tmp_path / "r.raw", 8 * MiB)
    d = daemon(engine, *qcow2_args(img), "--blockdev",
               f"driver=file,node-name=f1,filename={raw}", nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="q0", name="b0")
    qok(q, "block-dirty-bitmap-add", node="q0", name="fine", granularity=4096)
    qok(q, "block-dirty-bitmap-add", node="q0", name="off", disabled=True)
    qok(q, "block-dirty-bitmap-add", node="f0", name="file")
    qok(q, "block-dirty-bitmap-add", node="f1", name="small", granularity=4096)
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    uri = d.nbd_uri("q0")
    # (the discard is dropped before it is tracked: the node has discard=ignore)
    qemu_io(uri, "write -P 1 0 4k", "write -P 2 1M 100k", "write -z 3M 64k",
            "write -P 3 8388607 1", "discard 6M 64k")
    assert bitmaps(q, "q0") == [bm("off", recording=False), bm("fine", 4096 * 43, 4096),
                                bm("b0", 5 * K64)]
    # the qcow2 driver's own writes to its file are tracked by the file's bitmap
    assert bitmaps(q, "f0")[0]["count"] > 0
    qok(q, "block-dirty-bitmap-disable", node="q0", name="b0")
    qok(q, "block-dirty-bitmap-enable", node="q0", name="off")
    qemu_io(uri, "write -P 4 2M 4k")
    assert [b["count"] for b in bitmaps(q, "q0")] == [K64, 4096 * 44, 5 * K64]
    qok(q, "block-dirty-bitmap-merge", node="q0", target="off", bitmaps=["b0", "fine"])
    assert bitmaps(q, "q0")[0]["count"] == 6 * K64
    qok(q, "block-dirty-bitmap-clear", node="q0", name="fine")
    assert bitmaps(q, "q0")[1]["count"] == 0
    # a bitmap of another size cannot be merged in
    assert qerr(q, "block-dirty-bitmap-merge", node="q0", target="b0",
                   bitmaps=[{"node": "f0", "name": "file"}])["desc"] == \
        "Bitmaps are of different sizes (destination size is 8388608, source size is 655360) " \
        "and can't be merged"
    q.cmd("block-export-del", id="e0")
    d.quit()


# --- persistence -----------------------------------------------------------------------------

def test_persistent_bitmap_survives_quit(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "p.qcow2", "16M")
    d = daemon(engine, *qcow2_args(img), nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="q0", name="pa", persistent=True)
    qok(q, "block-dirty-bitmap-add", node="q0", name="pd", persistent=True, disabled=True,
          granularity=4096)
    qok(q, "block-dirty-bitmap-add", node="q0", name="tmp")
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    qemu_io(d.nbd_uri("q0"), "write 0 100k", "write 9M 1k")
    qok(q, "block-dirty-bitmap-merge", node="q0", target="pd", bitmaps=["pa"])
    q.cmd("block-export-del", id="e0")
    d.quit()
    # stored newest first, as QEMU walks the node's list
    assert disk_bitmaps(img) == [{"flags": [], "name": "pd", "granularity": 4096},
                                 {"flags": ["auto"], "name": "pa", "granularity": K64}]
    check_clean(img)
    # QEMU reads what the engine stored
    r = daemon("qsd", *qcow2_args(img))
    assert bitmaps(r.qmp, "q0") == [bm("pa", 3 * K64, persistent=True),
                                    bm("pd", 3 * K64, 4096, recording=False, persistent=True)]
    r.quit()
    check_clean(img)


def test_reads_bitmaps_qemu_wrote(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "q.qcow2", "16M", "-o", "cluster_size=4096")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_img("bitmap", "--add", "-g", "512", str(img), "fine")
    qemu_img("bitmap", "--add", "--disable", str(img), "off")
    qemu_io(img, "write 0 4k", "write 5M 600k", "write 16773120 4096", fmt="qcow2")
    assert disk_bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": 4096},
                                 {"flags": ["auto"], "name": "fine", "granularity": 512},
                                 {"flags": [], "name": "off", "granularity": 4096}]
    d = daemon(engine, *qcow2_args(img))
    q = d.qmp
    want = [bm("off", 0, 4096, recording=False, persistent=True),
            bm("fine", 4096 + 600 * 1024 + 4096, 512, persistent=True),
            bm("b0", 4096 + 600 * 1024 + 4096, 4096, persistent=True)]
    assert bitmaps(q, "q0") == want
    # opened read/write: the bitmaps are in use on disk until the image is closed
    assert [b["flags"] for b in disk_bitmaps(img)] == [["in-use", "auto"], ["in-use", "auto"],
                                                      ["in-use"]]
    d.quit()
    assert [b["flags"] for b in disk_bitmaps(img)] == [["auto"], ["auto"], []]
    check_clean(img)
    # the same bits come back after a round trip through the engine
    d = daemon(engine, *qcow2_args(img, extra=",read-only=on"))
    assert bitmaps(d.qmp, "q0") == want
    assert qerr(d.qmp, "block-dirty-bitmap-clear", node="q0", name="b0")["desc"] == \
        "Bitmap 'b0' is readonly and cannot be modified"
    d.quit()


def test_unclean_shutdown_leaves_bitmap_inconsistent(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "u.qcow2", "4M")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 0 64k", fmt="qcow2")
    d = daemon(engine, *qcow2_args(img), nbd=True)
    assert bitmaps(d.qmp, "q0") == [bm("b0", K64, persistent=True)]
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    qemu_io(d.nbd_uri("q0"), "write 2M 64k")   # allocates: the image is dirty too
    assert bitmaps(d.qmp, "q0") == [bm("b0", 2 * K64, persistent=True)]
    d.kill()
    assert disk_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b0",
                                  "granularity": K64}]
    d = daemon(engine, *qcow2_args(img))
    q = d.qmp
    assert bitmaps(q, "q0") == [bm("b0", 0, recording=False, persistent=True,
                                   inconsistent=True)]
    text = "Bitmap 'b0' is inconsistent and cannot be used"  # the hint is not in the reply
    for cmd in ("clear", "enable", "disable"):
        assert qerr(q, "block-dirty-bitmap-" + cmd, node="q0", name="b0")["desc"] == text
    qok(q, "block-dirty-bitmap-add", node="q0", name="n0")
    assert qerr(q, "block-dirty-bitmap-merge", node="q0", target="n0",
                   bitmaps=["b0"])["desc"] == text
    assert qok(q, "block-dirty-bitmap-remove", node="q0", name="b0") == {}
    assert disk_bitmaps(img) is None
    d.quit()
    check_clean(img)


# --- transactions ------------------------------------------------------------------------------

def act(kind, **data):
    return {"type": "block-dirty-bitmap-" + kind, "data": data}


def test_transaction_bitmap_actions_and_rollback(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "t.qcow2", "8M")
    d = daemon(engine, *qcow2_args(img), nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="q0", name="a")
    qok(q, "block-dirty-bitmap-add", node="q0", name="c", disabled=True)
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    qemu_io(d.nbd_uri("q0"), "write 0 128k")
    before = bitmaps(q, "q0")
    assert before == [bm("c", recording=False), bm("a", 2 * K64)]
    # every action prepared, then the last one fails: all are rolled back
    e = q.error("transaction", actions=[
        act("add", node="q0", name="t1"),
        act("clear", node="q0", name="a"),
        act("enable", node="q0", name="c"),
        act("merge", node="q0", target="c", bitmaps=["a"]),
        act("remove", node="q0", name="a"),
        act("disable", node="q0", name="zz")])
    assert e["desc"] == "Dirty bitmap 'zz' not found"
    assert bitmaps(q, "q0") == before
    e = q.error("transaction", actions=[act("remove", node="q0", name="c"),
                                        act("remove", node="q0", name="c")])
    assert e["desc"] == "Bitmap 'c' is currently in use by another operation and cannot be used"
    e = q.error("transaction", actions=[act("add", node="q0", name="t1"),
                                        act("add", node="q0", name="t1")])
    assert e["desc"] == "Bitmap already exists: t1"
    assert bitmaps(q, "q0") == before
    e = q.error("transaction", actions=[act("clear", node="q0", name="a")],
                properties={"completion-mode": "grouped"})
    assert e["desc"] == ("Action 'block-dirty-bitmap-clear' does not support Transaction "
                         "property completion-mode = grouped")
    # success: the point-in-time switch of an incremental backup scheme
    assert q.cmd("transaction", actions=[
        act("add", node="q0", name="next"),
        act("merge", node="q0", target="c", bitmaps=["a"]),
        act("clear", node="q0", name="a"),
        act("enable", node="q0", name="c"),
        act("remove", node="q0", name="a")]) == {}
    assert bitmaps(q, "q0") == [bm("next"), bm("c", 2 * K64)]
    qemu_io(d.nbd_uri("q0"), "write 4M 1")
    assert bitmaps(q, "q0") == [bm("next", K64), bm("c", 3 * K64)]
    q.cmd("block-export-del", id="e0")
    d.quit()


def test_discard_and_zeroes_tracked_with_unmap(daemon, engine, tmp_path):
    raw = make_raw_image(tmp_path / "u.raw", 4 * MiB, fill=b"\x11")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={raw},discard=unmap",
               "--blockdev", "driver=raw,node-name=r0,file=f0,discard=unmap", nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="r0", name="b", granularity=4096)
    qok(q, "block-dirty-bitmap-add", node="f0", name="f", granularity=4096)
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    qemu_io(d.nbd_uri("r0"), "discard 1M 64k", "write -z -u 2M 8k", "write -z 3M 4097")
    assert bitmaps(q, "r0") == [bm("b", 4096 * 20, 4096)]
    assert bitmaps(q, "f0") == [bm("f", 4096 * 20, 4096)]
    q.cmd("block-export-del", id="e0")
    d.quit()


def test_transaction_remove_of_persistent_bitmap_rolled_back(daemon, engine, tmp_path):
    """The remove action takes a persistent bitmap off the disk in prepare; an abort
    keeps it in memory and the close stores it again."""
    img = qcow2(tmp_path / "r.qcow2", "4M")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 1M 64k", fmt="qcow2")
    d = daemon(engine, *qcow2_args(img))
    q = d.qmp
    e = q.error("transaction", actions=[act("remove", node="q0", name="b0"),
                                        act("clear", node="q0", name="zz")])
    assert e["desc"] == "Dirty bitmap 'zz' not found"
    assert bitmaps(q, "q0") == [bm("b0", K64, persistent=True)]
    assert disk_bitmaps(img) is None
    d.quit()
    assert disk_bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": K64}]
    check_clean(img)
    r = daemon("qsd", *qcow2_args(img, extra=",read-only=on"))
    assert bitmaps(r.qmp, "q0") == [bm("b0", K64, persistent=True)]
    r.quit()


def test_block_resize_resizes_bitmaps(daemon, engine, tmp_path):
    """The new area of a grown node is clean; shrinking drops the bits past the end."""
    raw = make_raw_image(tmp_path / "z.raw", 4 * MiB)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={raw}",
               "--blockdev", "driver=raw,node-name=r0,file=f0", nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="r0", name="on")
    qok(q, "block-dirty-bitmap-add", node="r0", name="off", disabled=True)
    q.cmd("block_resize", **{"node-name": "r0"}, size=8 * MiB)
    assert bitmaps(q, "r0") == [bm("off", recording=False), bm("on", 0)]
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    qemu_io(d.nbd_uri("r0"), "write 1M 1", "write 7M 1")
    q.cmd("block-export-del", id="e0")
    assert bitmaps(q, "r0") == [bm("off", recording=False), bm("on", 2 * K64)]
    q.cmd("block_resize", **{"node-name": "r0"}, size=2 * MiB)
    assert bitmaps(q, "r0") == [bm("off", recording=False), bm("on", K64)]
    q.cmd("block_resize", **{"node-name": "r0"}, size=8 * MiB)
    assert bitmaps(q, "r0") == [bm("off", recording=False), bm("on", K64)]
    d.quit()


def test_parallel_writers_count_every_chunk(daemon, engine, tmp_path, libnbd):
    """Four NBD connections write at once: the bitmap has exactly the chunks written."""
    import random
    import threading
    img = qcow2(tmp_path / "w.qcow2", "64M")
    d = daemon(engine, *qcow2_args(img), nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="q0", name="b", granularity=4096)
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    uri = d.nbd_uri("q0")
    chunks = set()
    plans = []
    for seed in range(4):
        rnd = random.Random(seed)
        plan = []
        for _ in range(150):
            off, n = rnd.randrange(64 * MiB - 70000), rnd.randrange(1, 70000)
            plan.append((off, n))
            chunks.update(range(off // 4096, (off + n - 1) // 4096 + 1))
        plans.append(plan)
    errors = []

    def writer(plan):
        try:
            h = libnbd.NBD()
            h.connect_uri(uri)
            for off, n in plan:
                if n % 3:
                    h.pwrite(b"\x5a" * n, off)
                else:
                    h.zero(n, off)
            h.shutdown()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert bitmaps(q, "q0") == [bm("b", 4096 * len(chunks), 4096)]
    q.cmd("block-export-del", id="e0")
    d.quit()


def test_blockdev_del_stores(daemon, engine, tmp_path):
    img = qcow2(tmp_path / "del.qcow2", "4M")
    d = daemon(engine)
    q = d.qmp
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"},
          file={"driver": "file", "filename": str(img)})
    qok(q, "block-dirty-bitmap-add", node="q0", name="keep", persistent=True)
    qok(q, "block-dirty-bitmap-add", node="q0", name="gone")
    assert disk_bitmaps(img) is None            # stored at close, not before
    q.cmd("blockdev-del", **{"node-name": "q0"})
    assert disk_bitmaps(img) == [{"flags": ["auto"], "name": "keep", "granularity": K64}]
    check_clean(img)
    d.quit()
