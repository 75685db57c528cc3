"""Throttle groups and the leaky-bucket algorithm, driven by a fake clock.

Every wait is computed by hand from QEMU's formulas (util/throttle.c):
``throttle_fix_bucket`` gives a bucket without ``*-max`` an implicit burst of
``avg / 10``; a request must wait while ``level - max * burst_length > 0``,
``extra * 1e9 / avg`` ns; a bucket leaks ``avg`` units per second.  The group
hands its quota round-robin to the members with queued requests
(block/throttle-groups.c).
"""

import threading

import pytest

from blockd import drivers
from blockd.errors import QMPError
from blockd.graph.graph import Graph
from blockd.graph.throttle import (NANOSECONDS_PER_SECOND, READ, WRITE, ThrottleConfig,
                                   ThrottleGroup, ThrottleGroupMember)
from blockd.objects import ObjectTree
from blockd.qmp.schema import Schema

MS = 1000000


class FakeClock:
    def __init__(self):
        self.now = 0

    def __call__(self):
        return self.now


def make_group(limits, clock=None):
    clock = clock or FakeClock()
    group = ThrottleGroup("tg", clock)
    cfg = ThrottleConfig()
    cfg.apply_limits(limits)
    group.config(cfg)
    return group, clock


class Sim:
    """Runs requests through a group without threads: submit, then advance the
    clock to each timer, fire it and resume the woken requests, recording when
    every request was granted."""

    def __init__(self, group, clock):
        self.group, self.clock = group, clock
        self.queued = []
        self.granted = []

    def submit(self, member, size=4096, is_write=READ, label=None):
        label = label or member.name
        ticket = self.group.submit(member, size, is_write)
        if ticket is None:
            self.granted.append((label, self.clock.now))
        else:
            self.queued.append((ticket, label))

    def _resume_woken(self):
        progress = True
        while progress:
            progress = False
            for entry in list(self.queued):
                ticket, label = entry
                if ticket.woken:
                    self.queued.remove(entry)
                    self.granted.append((label, self.clock.now))
                    self.group.resume(ticket)
                    progress = True

    def run(self, limit=1000):
        for _ in range(limit):
            deadline = self.group.run_timers()
            self._resume_woken()
            if not self.queued:
                return self.granted
            deadline = self.group.run_timers()
            assert deadline is not None, "requests queued but no timer armed"
            self.clock.now = max(self.clock.now, deadline)
        raise AssertionError("did not finish")


# --- validation: QEMU's texts, in QEMU's order --------------------------------------------

@pytest.mark.parametrize("limits,error", [
    ({"iops-total": 20, "iops-read": 3},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total-max": 10, "bps-write-max": 10, "bps-total": 1, "bps-write": 0},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total": 10, "iops-size": 512}, "iops size requires an iops value to be set"),
    ({"bps-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"iops-write": 1000000000000001},
     "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-total": 10, "bps-total-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-total": 10, "bps-total-max-length": 2}, "burst length set without burst rate"),
    ({"bps-total": 10, "bps-total-max": 20, "bps-total-max-length": -1},
     "burst length too high for this burst rate"),
    ({"bps-total-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-read": 10, "iops-read-max": 5}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"bps-total-max-length": 4294967296},
     "bps-total-max-length value must be in the range [0, 4294967295]"),
])
def test_invalid_limits(limits, error):
    with pytest.raises(QMPError) as exc:
        ThrottleConfig().apply_limits(limits)
    assert exc.value.desc == error


def test_limits_round_trip_hides_the_implicit_burst():
    group, _ = make_group({"iops-total": 100, "bps-read": 1000, "bps-read-max": 5000,
                           "bps-read-max-length": 3, "iops-size": 4096})
    limits = group.get_config().to_limits()
    assert limits["iops-total"] == 100
    assert limits["iops-total-max"] == 0          # not the internal 10
    assert group.ts.cfg.buckets[3].max == 10      # ... which is in effect
    assert (limits["bps-read"], limits["bps-read-max"], limits["bps-read-max-length"]) == \
        (1000, 5000, 3)
    assert limits["iops-size"] == 4096
    assert limits["bps-write-max-length"] == 1


# --- single member: the exact waits -------------------------------------------------------

def test_iops_two_pass_then_one_per_tenth():
    """iops-total=10: max = 1, so a request waits once the level exceeds 1;
    the first two pass at t=0, then one every 100 ms."""
    group, clock = make_group({"iops-total": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    for _ in range(5):
        sim.submit(a)
    assert sim.run() == [("a", 0), ("a", 0), ("a", 100 * MS), ("a", 200 * MS),
                         ("a", 300 * MS)]


def test_bps_wait_is_the_excess_over_the_rate():
    """bps-total=1 MiB/s: burst 104857.6 bytes; the third 64 KiB read finds
    131072 bytes in the bucket and waits 26214.4 / 1048576 s = 25 ms -- less one
    ns: 104857.6 is not exact in a double, and QEMU's int64 cast truncates
    (a C program doing the same arithmetic prints 24999999)."""
    group, clock = make_group({"bps-total": 1048576})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    for _ in range(3):
        sim.submit(a, size=65536)
    granted = sim.run()
    assert [t for _, t in granted] == [0, 0, 25 * MS - 1]


def test_iops_size_counts_large_requests_as_several():
    """iops-size=4096: a 16 KiB request is 4 operations; with iops-total=10 the
    next request waits (4 - 1) / 10 s."""
    group, clock = make_group({"iops-total": 10, "iops-size": 4096})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    sim.submit(a, size=16384)
    sim.submit(a, size=512)
    assert sim.run() == [("a", 0), ("a", 300 * MS)]


def test_burst_runs_at_max_rate():
    """iops 10, max 20 for 2 s: the burst bucket allows max / 10 = 2 ops of
    credit, so three pass at once, then one every 1/20 s."""
    group, clock = make_group({"iops-total": 10, "iops-total-max": 20,
                               "iops-total-max-length": 2})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    for _ in range(6):
        sim.submit(a)
    assert [t for _, t in sim.run()] == [0, 0, 0, 50 * MS, 100 * MS, 150 * MS]


def test_read_limit_leaves_writes_alone():
    group, clock = make_group({"iops-read": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    for _ in range(3):
        sim.submit(a, is_write=READ, label="r")
    for _ in range(3):
        sim.submit(a, is_write=WRITE, label="w")
    assert sim.run() == [("r", 0), ("r", 0), ("w", 0), ("w", 0), ("w", 0),
                         ("r", 100 * MS)]


def test_no_limits_never_wait():
    group, clock = make_group({})
    a = ThrottleGroupMember("a")
    group.register(a)
    assert all(group.submit(a, 1 << 20, WRITE) is None for _ in range(100))


# --- the group: one quota, round-robin ---------------------------------------------------

def test_members_share_one_quota_round_robin():
    """Two members, iops-total=10 for the group: after the free burst they
    alternate, one request per 100 ms for the group as a whole (5/s each)."""
    group, clock = make_group({"iops-total": 10})
    a, b = ThrottleGroupMember("a"), ThrottleGroupMember("b")
    group.register(a)
    group.register(b)
    sim = Sim(group, clock)
    for _ in range(3):
        sim.submit(a)
        sim.submit(b)
    assert sim.run() == [("a", 0), ("b", 0), ("a", 100 * MS), ("b", 200 * MS),
                         ("a", 300 * MS), ("b", 400 * MS)]


def test_three_members_take_turns_even_when_one_queues_more():
    group, clock = make_group({"iops-total": 10})
    members = [ThrottleGroupMember(n) for n in "abc"]
    for m in members:
        group.register(m)
    a, b, c = members
    sim = Sim(group, clock)
    sim.submit(a)
    sim.submit(a)
    for _ in range(4):
        sim.submit(a)
    sim.submit(b)
    sim.submit(c)
    order = [name for name, _ in sim.run()]
    # a's 3rd request armed the timer; then the round-robin list, newest
    # member first (QLIST_INSERT_HEAD: c, b, a), gives c and b their turn
    # before a's 4th
    assert order == ["a", "a", "a", "c", "b", "a", "a", "a"]
    assert [t for _, t in sim.granted][2:] == [100 * MS * i for i in range(1, 7)]


def test_separate_groups_do_not_share():
    clock = FakeClock()
    g1, _ = make_group({"iops-total": 10}, clock)
    g2, _ = make_group({"iops-total": 10}, clock)
    a, b = ThrottleGroupMember("a"), ThrottleGroupMember("b")
    g1.register(a)
    g2.register(b)
    assert [g1.submit(a, 512, READ) is None for _ in range(3)] == [True, True, False]
    assert [g2.submit(b, 512, READ) is None for _ in range(3)] == [True, True, False]


def test_new_limits_reset_the_buckets():
    """qom-set limits (throttle_config) empties the buckets: a member that had
    to wait may go again at once."""
    group, clock = make_group({"iops-total": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    assert group.submit(a, 512, READ) is None
    assert group.submit(a, 512, READ) is None
    assert group.ts.compute_wait_for(READ) == 100 * MS
    cfg = group.get_config()
    cfg.apply_limits({"iops-total": 1000})
    group.config(cfg)
    assert group.ts.compute_wait_for(READ) == 0
    assert group.get_config().to_limits()["iops-total"] == 1000


def test_unregister_moves_the_token():
    group, _ = make_group({"iops-total": 10})
    a, b = ThrottleGroupMember("a"), ThrottleGroupMember("b")
    group.register(a)
    group.register(b)
    assert group.tokens == [a, a]
    group.unregister(a)
    assert group.tokens == [b, b] and group.members == [b]
    group.unregister(b)
    assert group.tokens == [None, None] and not group.in_use()


# --- the blocking wrapper -----------------------------------------------------------------

def test_intercept_blocks_until_the_clock_reaches_the_timer():
    group, clock = make_group({"iops-total": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    group.intercept(a, 512, READ)
    group.intercept(a, 512, READ)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (group.intercept(a, 512, READ), done.set()))
    worker.start()
    try:
        assert not done.wait(0.3)          # fake time stands still: still waiting
        with group.lock:
            clock.now = 99 * MS
            group.lock.notify_all()
        assert not done.wait(0.3)          # 1 ms short of the timer
        with group.lock:
            clock.now = 100 * MS
            group.lock.notify_all()
        assert done.wait(10)
    finally:
        with group.lock:
            clock.now = 10 * NANOSECONDS_PER_SECOND
            group.lock.notify_all()
        worker.join(10)
    assert a.pending_reqs == [0, 0]


def test_intercept_lets_requests_through_while_draining():
    """A drain lifts the member's limits (throttle_co_drain_begin): the request
    that would wait 100 ms passes with the fake clock standing still."""
    group, clock = make_group({"iops-total": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    for _ in range(2):
        group.intercept(a, 512, READ)
    group.intercept(a, 512, READ, bypass=lambda: True)
    assert clock.now == 0 and a.pending_reqs == [0, 0] and a.io_limits_disabled == 0


# --- the driver and the object tree, in-process --------------------------------------------

def test_throttle_node_joins_and_leaves_its_group(tmp_path):
    tree = ObjectTree(Schema.default(), clock=FakeClock())
    graph = Graph(drivers.lookup)
    graph.throttle_groups = tree.throttle_groups
    base = {"driver": "throttle", "file": {"driver": "null-co", "size": 1 << 20}}
    with pytest.raises(QMPError) as exc:
        graph.open(dict(base, **{"node-name": "t0", "throttle-group": "tg"}))
    assert exc.value.desc == "Throttle group 'tg' does not exist"
    assert graph.nodes == {}                    # the inline child was closed again
    tree.add("throttle-group", "tg", {"limits": {"bps-total": 1 << 30}})
    t0 = graph.open(dict(base, **{"node-name": "t0", "throttle-group": "tg"}))
    t1 = graph.open(dict(base, **{"node-name": "t1", "throttle-group": "tg"}))
    group = tree.throttle_groups["tg"].group
    assert [m.name for m in group.members] == ["t1", "t0"]
    assert t0.pread(0, 4096) == bytes(4096)
    assert t0.getlength() == 1 << 20
    with pytest.raises(QMPError) as exc:
        tree.delete("tg")
    assert exc.value.desc == "object 'tg' is in use, can not be deleted"
    graph.delete(t0)
    graph.delete(t1)
    assert not group.in_use()
    tree.delete("tg")
    assert tree.throttle_groups == {}
    with pytest.raises(QMPError) as exc:
        tree.delete("tg")
    assert exc.value.desc == "object 'tg' not found"


def test_legacy_properties_before_completion_only():
    tree = ObjectTree(Schema.default(), clock=FakeClock())
    obj = tree.add("throttle-group", "tg", {"x-iops-total": 100, "x-iops-total-max": 150,
                                           "x-iops-total-max-length": 4})
    assert obj.get("limits")["iops-total-max-length"] == 4
    assert obj.get("x-iops-total-max") == 150
    with pytest.raises(QMPError) as exc:
        obj.set("x-iops-total", 5, tree.visit)
    assert exc.value.desc == "Property cannot be set after initialization"
    obj.set("limits", {"iops-total": 7}, tree.visit)
    assert obj.get("x-iops-total") == 7
    assert obj.get("x-iops-total-max") == 150


def test_nbd_reads_throttle_only_the_data_ranges(tmp_path):
    """qsd's NBD server sends zero ranges as holes without reading them
    (nbd_co_send_sparse_read): only the data ranges pass the throttle, each
    as one request.  A hole of 1 MiB then 64 KiB of data: one operation and
    65536 bytes are accounted."""
    from blockd.graph.io import SEG_ZERO
    from blockd.graph.throttle import BPS_TOTAL, OPS_TOTAL
    img = tmp_path / "a.raw"
    with open(img, "wb") as f:
        f.truncate(2 << 20)
        f.seek(1 << 20)
        f.write(b"\x5a" * 65536)
    tree = ObjectTree(Schema.default(), clock=FakeClock())
    graph = Graph(drivers.lookup)
    graph.throttle_groups = tree.throttle_groups
    tree.add("throttle-group", "tg", {"limits": {"iops-total": 1000}})
    node = graph.open({"driver": "throttle", "node-name": "t", "throttle-group": "tg",
                       "file": {"driver": "file", "filename": str(img)}})
    segs = node.read_segments(0, (1 << 20) + 65536)
    assert segs[0] == (SEG_ZERO, 1 << 20)
    assert sum(s[1] if s[0] == SEG_ZERO else s[-1] for s in segs) == (1 << 20) + 65536
    buckets = tree.throttle_groups["tg"].group.ts.cfg.buckets
    assert (buckets[BPS_TOTAL].level, buckets[OPS_TOTAL].level) == (65536, 1)
    assert node.pread(0, 4096) == bytes(4096)        # a plain read is always accounted
    assert (buckets[BPS_TOTAL].level, buckets[OPS_TOTAL].level) == (65536 + 4096, 2)
    graph.delete(node)


def test_drain_begin_releases_the_queue_and_drain_end_restores_limits():
    group, clock = make_group({"iops-total": 10})
    a = ThrottleGroupMember("a")
    group.register(a)
    sim = Sim(group, clock)
    for _ in range(4):
        sim.submit(a)
    assert len(sim.queued) == 2
    group.drain_begin(a)
    sim._resume_woken()
    assert sim.granted == [("a", 0)] * 4 and not sim.queued
    group.drain_end(a)
    sim.submit(a)                                   # limits apply again
    assert len(sim.queued) == 1


def test_unregister_with_queued_requests_releases_them_and_keeps_the_others_going():
    """Not a QEMU path (QEMU drains first); blockd's shutdown closes nodes
    without draining, so a waiting request is let go, and the group's other
    members are scheduled again."""
    group, clock = make_group({"iops-total": 10})
    a, b = ThrottleGroupMember("a"), ThrottleGroupMember("b")
    group.register(a)
    group.register(b)
    sim = Sim(group, clock)
    sim.submit(a)
    sim.submit(a)
    sim.submit(a)            # arms a's timer
    sim.submit(b)            # queued behind it
    group.unregister(a)
    a_ticket = sim.queued[0][0]
    assert a_ticket.woken
    sim.queued.pop(0)
    group.resume(a_ticket)   # released: nothing accounted, nothing scheduled
    assert sim.run() == [("a", 0), ("a", 0), ("b", 100 * MS)]
