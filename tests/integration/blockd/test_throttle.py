"""Throttle groups, QOM commands and the throttle filter, on qsd and blockd alike.

Every expected value is what qemu-storage-daemon 7.2 answers (the qsd cases
prove it).  No timing is asserted: the quota sharing itself is checked with
a fake clock in tests/unit/blockd/test_throttle.py; here the limits only have
to be visible, survive round trips, and let correct data through.
"""

import pytest

from helpers import MiB, make_raw_image, nbdcopy, qemu_io

GROUP_PROPS = [
    "type", "x-bps-write-max-length", "x-iops-total-max-length", "x-iops-size", "limits",
    "x-bps-total", "x-iops-read-max-length", "x-bps-write", "x-iops-write-max-length",
    "x-bps-read-max", "x-iops-read-max", "x-bps-total-max", "x-bps-read-max-length",
    "x-iops-read", "x-bps-read", "x-bps-write-max", "x-iops-total-max", "x-iops-total",
    "x-iops-write", "x-bps-total-max-length", "x-iops-write-max",
]


def limits(**values):
    """A full ThrottleLimits as qom-get returns it: zeroes, burst lengths 1."""
    out = {name: 0 for name in (
        "iops-total", "iops-total-max", "iops-read", "iops-read-max", "iops-write",
        "iops-write-max", "bps-total", "bps-total-max", "bps-read", "bps-read-max",
        "bps-write", "bps-write-max", "iops-size")}
    out.update({name: 1 for name in (
        "iops-total-max-length", "iops-read-max-length", "iops-write-max-length",
        "bps-total-max-length", "bps-read-max-length", "bps-write-max-length")})
    out.update({k.replace("_", "-"): v for k, v in values.items()})
    return out


def names(entries):
    return [e["name"] for e in entries]


def test_qom_tree_and_group_properties(daemon, engine):
    q = daemon(engine).qmp
    assert q.error("qom-list", path="/objects") == {
        "class": "DeviceNotFound", "desc": "Device '/objects' not found"}
    assert q.cmd("qom-list", path="/") == [{"name": "type", "type": "string"},
                                           {"name": "chardevs", "type": "child<container>"}]
    assert q.cmd("object-add", **{"qom-type": "throttle-group", "id": "tg0",
                                  "limits": {"iops-total": 100}}) == {}
    assert q.cmd("qom-list", path="/") == [{"name": "type", "type": "string"},
                                           {"name": "objects", "type": "child<container>"},
                                           {"name": "chardevs", "type": "child<container>"}]
    assert q.cmd("qom-list", path="/objects") == [
        {"name": "type", "type": "string"}, {"name": "tg0", "type": "child<throttle-group>"}]
    props = q.cmd("qom-list", path="/objects/tg0")
    assert names(props) == GROUP_PROPS
    assert {p["type"] for p in props} == {"string", "int", "ThrottleLimits"}
    assert q.cmd("qom-get", path="/objects/tg0", property="limits") == limits(iops_total=100)
    assert q.cmd("qom-get", path="/objects/tg0", property="x-iops-total") == 100
    assert q.cmd("qom-get", path="/objects/tg0", property="x-iops-total-max") == 0
    assert q.cmd("qom-get", path="tg0", property="type") == "throttle-group"  # partial path
    assert q.cmd("qom-get", path="/objects/tg0/", property="type") == "throttle-group"
    assert q.cmd("qom-get", path="/objects", property="tg0") == "/objects/tg0"
    assert q.cmd("qom-get", path="/objects", property="type") == "container"
    assert q.cmd("qom-get", path="/chardevs/qmp0", property="type") == "chardev-socket"
    assert names(q.cmd("qom-list", path="/chardevs/qmp0")) == ["type", "connected", "addr"]
    assert q.cmd("qom-get", path="qmp0", property="addr") == {"path": "qmp.sock", "type": "unix"}
    assert q.cmd("qom-get", path="qmp0", property="connected") is True
    # only qom-list tells an ambiguous path from a missing one
    assert q.error("qom-list", path="")["desc"] == "Path '' is ambiguous"
    assert q.error("qom-get", path="", property="type") == {
        "class": "DeviceNotFound", "desc": "Device '' not found"}
    assert q.error("qom-set", path="", property="type", value=1) == {
        "class": "DeviceNotFound", "desc": "Device '' not found"}
    assert q.error("qom-get", path="/objects/tg0", property="nope")["desc"] == \
        "Property 'throttle-group.nope' not found"
    assert q.error("qom-get", path="/objects/nope", property="limits") == {
        "class": "DeviceNotFound", "desc": "Device '/objects/nope' not found"}

    # qom-set of limits merges into the current ones; the legacy ones are frozen
    assert q.cmd("qom-set", path="/objects/tg0", property="limits",
                 value={"bps-total": 4 * MiB, "bps-total-max": 8 * MiB,
                        "bps-total-max-length": 3}) == {}
    assert q.cmd("qom-get", path="/objects/tg0", property="limits") == limits(
        iops_total=100, bps_total=4 * MiB, bps_total_max=8 * MiB, bps_total_max_length=3)
    for value, error in (
            ({"bps-read": 100}, "bps/iops/max total values and read/write values cannot be "
                                "used at the same time"),
            ({"iops-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
            ({"bps-total-max": 1}, "bps_max/iops_max cannot be lower than bps/iops"),
            ("x", "Invalid parameter type for 'limits', expected: object"),
            ({"bps-total": "x"}, "Invalid parameter type for 'limits.bps-total', "
                                 "expected: integer"),
            ({"nope": 1}, "Parameter 'limits.nope' is unexpected")):
        assert q.error("qom-set", path="/objects/tg0", property="limits",
                       value=value)["desc"] == error
    assert q.cmd("qom-get", path="/objects/tg0", property="x-bps-total-max-length") == 3
    assert q.error("qom-set", path="/objects/tg0", property="x-iops-total",
                   value=5)["desc"] == "Property cannot be set after initialization"
    assert q.error("qom-set", path="/objects/tg0", property="type",
                   value="x")["desc"] == "Property 'throttle-group.type' is not writable"
    assert q.cmd("qom-set", path="/objects/tg0", property="limits",
                 value={"bps-total": 0, "bps-total-max": 0, "bps-total-max-length": 1}) == {}
    assert q.cmd("qom-get", path="/objects/tg0", property="limits") == limits(iops_total=100)

    assert q.cmd("object-del", id="tg0") == {}
    assert q.cmd("qom-list", path="/objects") == [{"name": "type", "type": "string"}]
    assert q.error("object-del", id="tg0")["desc"] == "object 'tg0' not found"


def test_object_add_errors(daemon, engine):
    q = daemon(engine).qmp

    def add(oid, **props):
        return q.error("object-add", **{"qom-type": "throttle-group", "id": oid, **props})["desc"]

    assert add("e1", limits={"iops-total": 20, "iops-read": 3}) == \
        "bps/iops/max total values and read/write values cannot be used at the same time"
    assert add("e2", limits={"iops-size": 512}) == "iops size requires an iops value to be set"
    assert add("e3", limits={"bps-total-max": 10}) == \
        "bps_max/iops_max require corresponding bps/iops values"
    assert add("e4", limits={"bps-total": 10, "bps-total-max-length": 86401}) == \
        "burst length set without burst rate"
    assert add("e5", limits={"bps-total": 10, "bps-total-max": 20,
                             "bps-total-max-length": -1}) == \
        "burst length too high for this burst rate"
    assert add("e6", limits={"bps-total-max-length": 4294967296}) == \
        "bps-total-max-length value must be in the range [0, 4294967295]"
    assert add("e7", **{"x-bps-total": -5}) == "Property values cannot be negative"
    assert add("e8", **{"x-bps-total-max-length": 4294967296}) == \
        "x-bps-total-max-length value must be in therange [0, 4294967295]"
    assert add("e9", **{"x-bps-total-max-length": 0}) == "the burst length cannot be 0"
    assert add("e10", **{"x-iops-total": 5, "x-iops-read": 5}) == \
        "bps/iops/max total values and read/write values cannot be used at the same time"
    assert add("1bad") == "Parameter 'id' expects an identifier"
    assert q.error("object-add", **{"qom-type": "memory-backend-ram", "id": "m",
                                    "size": MiB})["desc"] == \
        "invalid object type: memory-backend-ram"
    # none of those left an object behind (those failing on completion created
    # the container); then a valid one, and its duplicate
    assert q.cmd("qom-list", path="/objects") == [{"name": "type", "type": "string"}]
    assert q.cmd("object-add", **{"qom-type": "throttle-group", "id": "d",
                                  "x-iops-total": 10, "limits": {"iops-total": 20}}) == {}
    # the QDict sets "limits" after "x-iops-total": the later value wins
    assert q.cmd("qom-get", path="d", property="x-iops-total") == 20
    assert add("d") == "attempt to add duplicate property 'd' to object (type 'container')"
    assert q.cmd("object-add", **{"qom-type": "secret", "id": "s0", "data": "abc"}) == {}
    assert q.cmd("object-add", **{"qom-type": "iothread", "id": "io0"}) == {}
    assert q.error("object-add", **{"qom-type": "secret", "id": "s1"})["desc"] == \
        "Either 'file' or 'data' must be provided"
    assert q.cmd("qom-get", path="s0", property="data") == "abc"
    assert q.cmd("qom-get", path="s0", property="loaded") is True
    assert q.cmd("qom-get", path="io0", property="thread-pool-max") == 64
    # hash-table order, with the tombstones the failed completions left
    assert q.cmd("qom-list", path="/objects") == [
        {"name": "type", "type": "string"}, {"name": "io0", "type": "child<iothread>"},
        {"name": "s0", "type": "child<secret>"}, {"name": "d", "type": "child<throttle-group>"}]
    assert names(q.cmd("qom-list", path="/objects/s0")) == [
        "type", "iv", "keyid", "loaded", "format", "file", "data"]


def test_two_throttle_nodes_share_a_group(daemon, engine, tmp_path):
    """Two exports over two throttle nodes of one group: data passes correctly
    (with the group's limit low enough to throttle), the group is in use until
    both nodes are gone."""
    a = make_raw_image(tmp_path / "a.raw", 4 * MiB)
    b = make_raw_image(tmp_path / "b.raw", 4 * MiB)
    d = daemon(engine, "--object", "throttle-group,id=tg,limits.iops-total=400", nbd=True)
    q = d.qmp
    for name, path in (("ta", a), ("tb", b)):
        assert q.cmd("blockdev-add", driver="throttle", **{
            "node-name": name, "throttle-group": "tg",
            "file": {"driver": "file", "filename": str(path)}}) == {}
        assert q.cmd("block-export-add", type="nbd", id=name, writable=True,
                     **{"node-name": name}) == {}
    # 40 + 40 writes through the two exports: beyond the group's free burst
    qemu_io(d.nbd_uri("ta"), *[f"write -P 0x{i + 1:02x} {i * 64}k 64k" for i in range(40)])
    qemu_io(d.nbd_uri("tb"), *[f"write -P 0x{0xa0 + i:02x} {i * 32}k 32k" for i in range(40)])
    nbdcopy(d.nbd_uri("ta"), tmp_path / "a.copy")
    nbdcopy(d.nbd_uri("tb"), tmp_path / "b.copy")
    expect_a = b"".join(bytes([i + 1]) * 65536 for i in range(40))
    expect_b = b"".join(bytes([0xa0 + i]) * 32768 for i in range(40))
    assert (tmp_path / "a.copy").read_bytes()[:len(expect_a)] == expect_a
    assert (tmp_path / "b.copy").read_bytes()[:len(expect_b)] == expect_b
    assert a.read_bytes()[:len(expect_a)] == expect_a

    assert q.cmd("qom-get", path="/objects/tg", property="limits") == limits(iops_total=400)
    node = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}["ta"]
    assert node["drv"] == "throttle"
    assert node["image"]["filename"] == (
        'json:{"throttle-group": "tg", "driver": "throttle", "file": {"driver": "file", '
        '"filename": "%s"}}' % a)
    assert q.error("object-del", id="tg")["desc"] == "object 'tg' is in use, can not be deleted"
    for name in ("ta", "tb"):
        q.cmd("block-export-del", id=name)
        q.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": name}})
    assert q.cmd("blockdev-del", **{"node-name": "ta"}) == {}
    assert q.error("object-del", id="tg")["desc"] == "object 'tg' is in use, can not be deleted"
    assert q.cmd("blockdev-del", **{"node-name": "tb"}) == {}
    assert q.cmd("object-del", id="tg") == {}
    assert q.error("blockdev-add", driver="throttle", **{
        "node-name": "ta", "throttle-group": "tg",
        "file": {"driver": "file", "filename": str(a)}})["desc"] == \
        "Throttle group 'tg' does not exist"


def test_new_limits_release_queued_requests(daemon, engine, tmp_path, libnbd):
    """iops-total=1 with 16 reads in flight: all but the first two are queued
    (14 s of quota).  After qom-set of new limits every queued request
    completes, with the right data (a lost wake-up would hang it here).  On
    both engines the timer armed under the old limits still fires first
    (within 0.9 s: throttle_group_set_limits() does not restart the queues),
    then the rest pass at once -- about 2 s for the test, not asserted."""
    img = make_raw_image(tmp_path / "a.raw", MiB, fill=b"\x42")
    d = daemon(engine, "--object", "throttle-group,id=tg,limits.iops-total=1",
               "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=f",
               "--export", "type=nbd,id=e,node-name=t,name=t", nbd=True)
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri("t"))
    bufs = [libnbd.Buffer(4096) for _ in range(16)]
    for i, buf in enumerate(bufs):
        h.aio_pread(buf, i * 4096)
    while h.aio_in_flight() > 14:      # the free burst: two reads
        h.poll(1000)
    assert h.aio_in_flight() >= 13     # the rest wait for the quota
    assert d.qmp.cmd("qom-set", path="/objects/tg", property="limits",
                     value={"iops-total": 100000}) == {}
    for _ in range(200):               # 20 s at most; done in about 1 s
        if not h.aio_in_flight():
            break
        h.poll(100)
    assert h.aio_in_flight() == 0
    assert all(buf.to_bytearray() == b"\x42" * 4096 for buf in bufs)
    h.shutdown()
    assert d.qmp.cmd("qom-get", path="tg", property="x-iops-total") == 100000


def test_throttle_node_errors_and_cli(daemon, engine, tmp_path):
    img = make_raw_image(tmp_path / "a.raw", MiB)
    d = daemon(engine, "--object", "throttle-group,id=tg,x-bps-total=1048576",
               "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=f")
    q = d.qmp
    assert q.cmd("qom-get", path="tg", property="limits") == limits(bps_total=MiB)
    assert q.error("blockdev-add", driver="throttle", **{
        "node-name": "t2", "file": "f"})["desc"] == "Parameter 'throttle-group' is missing"
    assert q.error("blockdev-add", driver="throttle", **{
        "node-name": "t2", "throttle-group": "nope", "file": "f"})["desc"] == \
        "Throttle group 'nope' does not exist"
    assert q.error("object-del", id="tg")["desc"] == "object 'tg' is in use, can not be deleted"
    assert q.cmd("blockdev-del", **{"node-name": "t"}) == {}
    assert q.cmd("object-del", id="tg") == {}


@pytest.mark.parametrize("option,error", [
    ("throttle-group,id=x,limits.iops-total=abc", "Parameter 'limits.iops-total' expects integer"),
    ("memory-backend-ram,id=x,size=1M", "invalid object type: memory-backend-ram"),
    ("throttle-group,id=x,limits.iops-read=5,limits.iops-total=4",
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ("throttle-group,id=x,foo=1", "Parameter 'foo' is unexpected"),
])
def test_object_option_errors(daemon, engine, option, error):
    prog = "qemu-storage-daemon" if engine == "qsd" else "blockd"
    res = daemon.run(engine, "--object", option)
    assert res.returncode == 1
    assert res.stderr == f"{prog}: --object {option}: {error}\n"
