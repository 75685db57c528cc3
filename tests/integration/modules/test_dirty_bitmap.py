"""blockdev.fleecing.dirty_bitmap against both engines, through ansible-playbook."""

from helpers import MiB, qemu_img, qemu_io

K64 = 64 * 1024


def bitmaps(q, node):
    """The named dirty bitmaps of NODE by name, as d.qmp sees them."""
    for n in q.cmd("query-named-block-nodes", flat=True):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps") or [] if "name" in b}
    raise AssertionError(f"no node {node}")


def start(engine_with_monitor, tmp_path):
    """A qcow2 node q0 (4 KiB clusters) exported writable as 'q0'; (daemon, socket)."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=f0,filename={img}",
                                  "--blockdev", "driver=qcow2,node-name=q0,file=f0")
    d.qmp.cmd("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "q0"})
    return d, sock


def test_present_enable_clear_merge_absent(engine_with_monitor, ansible, tmp_path):
    d, sock = start(engine_with_monitor, tmp_path)
    q = d.qmp
    args = {"socket": sock, "node": "q0", "name": "b0", "granularity": K64, "persistent": True}

    checked = ansible.module("dirty_bitmap", args, check=True, diff=True)
    assert checked["changed"] is True and not checked.get("failed"), checked
    assert checked["diff"] == {"before": {}, "after": {
        "name": "b0", "granularity": K64, "persistent": True, "recording": True, "count": 0}}
    assert bitmaps(q, "q0") == {}                       # check mode did nothing
    first = ansible.module("dirty_bitmap", args, diff=True)
    assert first["changed"] is True and first["diff"] == checked["diff"], first
    assert first["bitmap"] == bitmaps(q, "q0")["b0"]
    assert bitmaps(q, "q0")["b0"]["persistent"] is True
    second = ansible.module("dirty_bitmap", args, diff=True)
    assert second["changed"] is False and second["actions"] == [], second

    # writes make it dirty; clear: changed once, then nothing to clear
    qemu_io(d.nbd_uri("q0"), "write -P 1 0 4k", "write -P 2 1M 4k")
    assert bitmaps(q, "q0")["b0"]["count"] == 2 * K64
    # a differential copy made from b0 (disabled, with b0's dirty areas)
    diff_args = {"socket": sock, "node": "q0", "name": "diff", "enabled": False,
                 "merge_from": ["b0"]}
    made = ansible.module("dirty_bitmap", diff_args)
    assert made["changed"] is True, made
    assert [a["type"] for a in made["actions"]] == ["block-dirty-bitmap-add",
                                                    "block-dirty-bitmap-merge"]
    assert bitmaps(q, "q0")["diff"]["count"] == 2 * K64
    assert bitmaps(q, "q0")["diff"]["recording"] is False
    assert ansible.module("dirty_bitmap", diff_args)["changed"] is False

    clear = {**args, "clear": True}
    checked = ansible.module("dirty_bitmap", clear, check=True, diff=True)
    assert checked["changed"] is True and checked["diff"]["after"]["count"] == 0, checked
    assert bitmaps(q, "q0")["b0"]["count"] == 2 * K64   # check mode did nothing
    assert ansible.module("dirty_bitmap", clear)["changed"] is True
    assert bitmaps(q, "q0")["b0"]["count"] == 0
    assert bitmaps(q, "q0")["diff"]["count"] == 2 * K64
    assert ansible.module("dirty_bitmap", clear)["changed"] is False

    # disable, then enable
    off = ansible.module("dirty_bitmap", {**args, "enabled": False}, diff=True)
    assert off["changed"] is True and off["diff"]["after"]["recording"] is False, off
    assert bitmaps(q, "q0")["b0"]["recording"] is False
    assert ansible.module("dirty_bitmap", {**args, "enabled": False})["changed"] is False
    assert ansible.module("dirty_bitmap", {**args, "enabled": True})["changed"] is True
    assert bitmaps(q, "q0")["b0"]["recording"] is True

    # absent: check mode, then changed, then not
    gone = {"socket": sock, "node": "q0", "name": "b0", "state": "absent"}
    checked = ansible.module("dirty_bitmap", gone, check=True, diff=True)
    assert checked["changed"] is True and checked["diff"]["after"] == {}, checked
    assert "b0" in bitmaps(q, "q0")
    assert ansible.module("dirty_bitmap", gone)["changed"] is True
    assert set(bitmaps(q, "q0")) == {"diff"}
    assert ansible.module("dirty_bitmap", gone)["changed"] is False
    # the node itself gone: nothing to remove
    assert ansible.module("dirty_bitmap", {**gone, "node": "nope"})["changed"] is False


def test_conflicting_granularity_fails_unless_recreate(engine_with_monitor, ansible, tmp_path):
    d, sock = start(engine_with_monitor, tmp_path)
    q = d.qmp
    q.cmd_raw("block-dirty-bitmap-add", {"node": "q0", "name": "b0", "granularity": K64})
    qemu_io(d.nbd_uri("q0"), "write -P 1 0 4k")
    args = {"socket": sock, "node": "q0", "name": "b0", "granularity": 4096}
    r = ansible.module("dirty_bitmap", args, diff=True)
    assert r["failed"] is True, r
    assert r["msg"] == ("dirty bitmap 'b0' of node 'q0' exists but granularity is 65536, "
                        "requested 4096; set recreate: true to replace it (its contents are lost)")
    assert r["diff"]["before"]["granularity"] == K64 and r["diff"]["after"]["granularity"] == 4096
    assert bitmaps(q, "q0")["b0"]["granularity"] == K64 and bitmaps(q, "q0")["b0"]["count"] == K64

    checked = ansible.module("dirty_bitmap", {**args, "recreate": True}, check=True)
    assert checked["changed"] is True, checked
    assert bitmaps(q, "q0")["b0"]["granularity"] == K64
    r = ansible.module("dirty_bitmap", {**args, "recreate": True})
    assert r["changed"] is True, r
    assert bitmaps(q, "q0")["b0"]["granularity"] == 4096 and bitmaps(q, "q0")["b0"]["count"] == 0
    assert ansible.module("dirty_bitmap", {**args, "recreate": True})["changed"] is False

    # recreate the engine refuses (persistent on a raw file node): the old one is back, empty
    q.cmd_raw("block-dirty-bitmap-add", {"node": "f0", "name": "fb", "granularity": K64})
    r = ansible.module("dirty_bitmap", {"socket": sock, "node": "f0", "name": "fb",
                                        "persistent": True, "recreate": True})
    assert r["failed"] is True, r
    assert r["msg"] == ("recreating dirty bitmap 'fb' on node 'f0' failed: Can't store persistent "
                        "bitmaps to f0: Operation not supported; the old bitmap was added back, "
                        "empty")
    assert bitmaps(q, "f0")["fb"]["persistent"] is False
    assert bitmaps(q, "f0")["fb"]["granularity"] == K64


def test_bad_input(engine_with_monitor, ansible, tmp_path):
    d, sock = start(engine_with_monitor, tmp_path)
    q = d.qmp
    q.cmd_raw("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    cases = [
        ({"node": "nope", "name": "b1"}, "node 'nope' does not exist"),
        ({"node": "q0", "name": "b1", "granularity": 1000},
         "Granularity must be power of 2 and at least 512"),
        ({"node": "q0", "name": "b1", "merge_from": ["nope"]},
         "merge_from: node 'q0' has no dirty bitmap 'nope'"),
        ({"node": "q0", "name": "b1", "merge_from": [{"node": "zz", "name": "b0"}]},
         "merge_from: node 'zz' does not exist"),
        ({"node": "q0", "name": "b1", "merge_from": [{"node": "q0"}]},
         "merge_from entries must be bitmap names or dicts with 'node' and 'name', "
         "not {'node': 'q0'}"),
        ({"node": "q0", "name": "b0", "clear": True, "merge_from": ["b0"]},
         "parameters are mutually exclusive: clear|merge_from"),
        ({"node": "q0", "name": "b0", "state": "absent", "clear": True},
         "clear: only with state=present"),
        ({"node": "f0", "name": "p", "persistent": True},
         "block-dirty-bitmap-add failed: Can't store persistent bitmaps to f0: "
         "Operation not supported"),
    ]
    for args, msg in cases:
        r = ansible.module("dirty_bitmap", {"socket": sock, **args})
        assert r["failed"] is True and r["msg"] == msg, (args, r)
    assert bitmaps(q, "q0").keys() == {"b0"} and bitmaps(q, "f0") == {}
    r = ansible.module("dirty_bitmap", {"socket": str(tmp_path / "nope.sock"),
                                        "node": "q0", "name": "b0"})
    assert r["failed"] is True
    assert r["msg"] == f"QMP socket {tmp_path / 'nope.sock'} does not exist: is the engine running?"
    assert d.alive()
