# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""I/O throttling: QEMU's leaky buckets (``util/throttle.c``) and throttle
groups (``block/throttle-groups.c``), with an injectable clock.

A :class:`ThrottleGroup` holds one :class:`ThrottleState` (six leaky buckets:
bytes and operations, total/read/write) shared by all its members
(:class:`ThrottleGroupMember`, one per ``throttle`` node).  A request first
asks the group (:meth:`ThrottleGroup.submit`); when the buckets are full it is
queued and a *timer* is armed on one member, the group's *token*.  When the
timer is due (:meth:`ThrottleGroup.run_timers`) the token's first queued
request is woken; when it resumes (:meth:`ThrottleGroup.resume`) it is
accounted and the next request is chosen round-robin among the members with
queued requests, exactly as QEMU's ``schedule_next_request()`` does.

The state machine never sleeps and never reads a real clock by itself: the
clock is a callable returning nanoseconds, so unit tests drive it with a fake
clock and check every wait.  :meth:`ThrottleGroup.intercept` is the blocking
wrapper the ``throttle`` driver calls from I/O threads: it sleeps on the
group's condition variable until the next timer is due (no busy loop).

Where QEMU runs coroutines later from the event loop (``aio_co_enter`` of a
restart coroutine), blockd wakes the request at once under the group lock;
the order in which requests are granted is the same.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

from ..errors import QMPError

NANOSECONDS_PER_SECOND = 1000000000
#: THROTTLE_VALUE_MAX (include/qemu/throttle.h).
THROTTLE_VALUE_MAX = 1000000000000000
UINT_MAX = 0xFFFFFFFF

# BucketType, in QEMU's order (the order throttle_is_valid() checks them in).
BPS_TOTAL, BPS_READ, BPS_WRITE, OPS_TOTAL, OPS_READ, OPS_WRITE = range(6)
BUCKETS_COUNT = 6

READ, WRITE = 0, 1

#: ThrottleLimits member -> (bucket, field), field one of avg/max/burst_length;
#: in the order throttle_limits_to_config() applies them.
LIMIT_FIELDS: Dict[str, "tuple[int, str]"] = {
    "bps-total": (BPS_TOTAL, "avg"), "bps-read": (BPS_READ, "avg"),
    "bps-write": (BPS_WRITE, "avg"), "iops-total": (OPS_TOTAL, "avg"),
    "iops-read": (OPS_READ, "avg"), "iops-write": (OPS_WRITE, "avg"),
    "bps-total-max": (BPS_TOTAL, "max"), "bps-read-max": (BPS_READ, "max"),
    "bps-write-max": (BPS_WRITE, "max"), "iops-total-max": (OPS_TOTAL, "max"),
    "iops-read-max": (OPS_READ, "max"), "iops-write-max": (OPS_WRITE, "max"),
    "bps-total-max-length": (BPS_TOTAL, "burst_length"),
    "bps-read-max-length": (BPS_READ, "burst_length"),
    "bps-write-max-length": (BPS_WRITE, "burst_length"),
    "iops-total-max-length": (OPS_TOTAL, "burst_length"),
    "iops-read-max-length": (OPS_READ, "burst_length"),
    "iops-write-max-length": (OPS_WRITE, "burst_length"),
}

#: The ThrottleLimits members in schema order (qom-get builds the reply in it).
LIMIT_NAMES = (
    "iops-total", "iops-total-max", "iops-total-max-length",
    "iops-read", "iops-read-max", "iops-read-max-length",
    "iops-write", "iops-write-max", "iops-write-max-length",
    "bps-total", "bps-total-max", "bps-total-max-length",
    "bps-read", "bps-read-max", "bps-read-max-length",
    "bps-write", "bps-write-max", "bps-write-max-length",
    "iops-size",
)


def _int64(value: int) -> int:
    """Wrap to a signed 64-bit value, as a C int64_t cast does."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


class LeakyBucket:
    """One bucket (QEMU's LeakyBucket): ``avg`` units/s, bursts of ``max``
    units/s for ``burst_length`` seconds."""

    __slots__ = ("avg", "max", "level", "burst_level", "burst_length")

    def __init__(self) -> None:
        self.avg: float = 0
        self.max: float = 0
        self.level: float = 0.0
        self.burst_level: float = 0.0
        self.burst_length: int = 1

    def copy(self) -> "LeakyBucket":
        new = LeakyBucket()
        for name in self.__slots__:
            setattr(new, name, getattr(self, name))
        return new

    def leak(self, delta_ns: int) -> None:
        """throttle_leak_bucket()."""
        leak = (self.avg * float(delta_ns)) / NANOSECONDS_PER_SECOND
        self.level = max(self.level - leak, 0.0)
        if self.burst_length > 1:
            leak = (self.max * float(delta_ns)) / NANOSECONDS_PER_SECOND
            self.burst_level = max(self.burst_level - leak, 0.0)

    def compute_wait(self) -> int:
        """throttle_compute_wait(): ns to wait before the bucket accepts I/O."""
        if not self.avg:
            return 0
        extra = self.level - self.max * self.burst_length
        if extra > 0:
            return int(extra * NANOSECONDS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - self.max / 10
            if extra > 0:
                return int(extra * NANOSECONDS_PER_SECOND / self.max)
        return 0


class ThrottleConfig:
    """QEMU's ThrottleConfig: six buckets and the I/O size of one operation."""

    def __init__(self) -> None:
        """throttle_config_init(): everything 0, burst lengths 1."""
        self.buckets: List[LeakyBucket] = [LeakyBucket() for _i in range(BUCKETS_COUNT)]
        self.op_size = 0

    def copy(self) -> "ThrottleConfig":
        new = ThrottleConfig()
        new.buckets = [b.copy() for b in self.buckets]
        new.op_size = self.op_size
        return new

    def enabled(self) -> bool:
        """throttle_enabled(): any limit set."""
        return any(b.avg > 0 for b in self.buckets)

    def check_valid(self) -> None:
        """throttle_is_valid(): raise QMPError with QEMU's text if invalid."""
        b = self.buckets
        bps = b[BPS_TOTAL].avg and (b[BPS_READ].avg or b[BPS_WRITE].avg)
        ops = b[OPS_TOTAL].avg and (b[OPS_READ].avg or b[OPS_WRITE].avg)
        bps_max = b[BPS_TOTAL].max and (b[BPS_READ].max or b[BPS_WRITE].max)
        ops_max = b[OPS_TOTAL].max and (b[OPS_READ].max or b[OPS_WRITE].max)
        if bps or ops or bps_max or ops_max:
            raise QMPError("bps/iops/max total values and read/write values"
                           " cannot be used at the same time")
        if self.op_size and not (b[OPS_TOTAL].avg or b[OPS_READ].avg or b[OPS_WRITE].avg):
            raise QMPError("iops size requires an iops value to be set")
        for bkt in b:
            if (bkt.avg < 0 or bkt.max < 0 or bkt.avg > THROTTLE_VALUE_MAX
                    or bkt.max > THROTTLE_VALUE_MAX):
                raise QMPError("bps/iops/max values must be within [0, %d]"
                               % THROTTLE_VALUE_MAX)
            if not bkt.burst_length:
                raise QMPError("the burst length cannot be 0")
            if bkt.burst_length > 1 and not bkt.max:
                raise QMPError("burst length set without burst rate")
            if bkt.max and bkt.burst_length > THROTTLE_VALUE_MAX / bkt.max:
                raise QMPError("burst length too high for this burst rate")
            if bkt.max and not bkt.avg:
                raise QMPError("bps_max/iops_max require corresponding bps/iops values")
            if bkt.max and bkt.max < bkt.avg:
                raise QMPError("bps_max/iops_max cannot be lower than bps/iops")

    def apply_limits(self, limits: Dict[str, int]) -> None:
        """throttle_limits_to_config(): merge a ThrottleLimits dict, then validate.

        :raise QMPError: a burst length beyond UINT_MAX, or an invalid result.
        """
        for name in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read",
                     "iops-write", "bps-total-max", "bps-read-max", "bps-write-max",
                     "iops-total-max", "iops-read-max", "iops-write-max"):
            if name in limits:
                idx, field = LIMIT_FIELDS[name]
                setattr(self.buckets[idx], field, limits[name])
        for name in ("bps-total-max-length", "bps-read-max-length", "bps-write-max-length",
                     "iops-total-max-length", "iops-read-max-length",
                     "iops-write-max-length"):
            if name in limits:
                value = limits[name]
                if value > UINT_MAX:
                    raise QMPError("%s value must be in the range [0, %d]" % (name, UINT_MAX))
                # an int64 stored in a uint64_t: -1 passes the check above
                # and becomes 2^64 - 1 ("burst length too high...")
                self.buckets[LIMIT_FIELDS[name][0]].burst_length = value & ((1 << 64) - 1)
        if "iops-size" in limits:
            self.op_size = limits["iops-size"] & ((1 << 64) - 1)
        self.check_valid()

    def to_limits(self) -> Dict[str, int]:
        """throttle_config_to_limits(), members in schema order."""
        out: Dict[str, int] = {}
        for name in LIMIT_NAMES:
            if name == "iops-size":
                out[name] = _int64(self.op_size)
            else:
                idx, field = LIMIT_FIELDS[name]
                out[name] = int(getattr(self.buckets[idx], field))
        return out


class ThrottleState:
    """QEMU's ThrottleState: the configured buckets and the last leak time."""

    def __init__(self) -> None:
        """throttle_init()."""
        self.cfg = ThrottleConfig()
        self.previous_leak = 0

    def config(self, cfg: ThrottleConfig, now: int) -> None:
        """throttle_config(): install ``cfg`` with empty buckets and the
        implicit burst (``max = avg / 10``) where none is set."""
        self.cfg = cfg.copy()
        for bkt in self.cfg.buckets:
            bkt.level = bkt.burst_level = 0.0
            if bkt.avg and not bkt.max:
                bkt.max = bkt.avg / 10
        self.previous_leak = now

    def get_config(self) -> ThrottleConfig:
        """throttle_get_config(): the configuration as set (implicit bursts undone)."""
        cfg = self.cfg.copy()
        for bkt in cfg.buckets:
            if bkt.max < bkt.avg:
                bkt.max = 0
        return cfg

    def do_leak(self, now: int) -> None:
        """throttle_do_leak()."""
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta <= 0:
            return
        for bkt in self.cfg.buckets:
            bkt.leak(delta)

    def compute_wait_for(self, is_write: int) -> int:
        """throttle_compute_wait_for(): the longest wait of the buckets that apply."""
        checked = ((BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ),
                   (BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE))[is_write]
        return max(self.cfg.buckets[i].compute_wait() for i in checked)

    def compute_timer(self, is_write: int, now: int) -> "Optional[int]":
        """throttle_compute_timer(): leak, then the deadline if I/O must wait."""
        self.do_leak(now)
        wait = self.compute_wait_for(is_write)
        return now + wait if wait else None

    def account(self, is_write: int, size: int) -> None:
        """throttle_account(): charge one request of ``size`` bytes."""
        units = 1.0
        if self.cfg.op_size and size > self.cfg.op_size:
            units = float(size) / self.cfg.op_size
        b = self.cfg.buckets
        for idx, amount in ((BPS_TOTAL, size), ((BPS_READ, BPS_WRITE)[is_write], size),
                            (OPS_TOTAL, units), ((OPS_READ, OPS_WRITE)[is_write], units)):
            b[idx].level += amount
            if b[idx].burst_length > 1:
                b[idx].burst_level += amount


class Ticket:
    """A queued request (an entry of QEMU's ``throttled_reqs`` CoQueue)."""

    __slots__ = ("member", "is_write", "size", "woken")

    def __init__(self, member: "ThrottleGroupMember", is_write: int, size: int) -> None:
        self.member = member
        self.is_write = is_write
        self.size = size
        self.woken = False


class ThrottleGroupMember:
    """QEMU's ThrottleGroupMember: one ``throttle`` node's place in a group.

    :param name: for messages and tests (the node name).
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.group: Optional[ThrottleGroup] = None
        self.pending_reqs = [0, 0]
        self.queues: List[List[Ticket]] = [[], []]
        #: Armed timer deadlines (ns) per direction, or None.
        self.timers: List[Optional[int]] = [None, None]
        #: >0 while the node is drained: requests pass unthrottled.
        self.io_limits_disabled = 0

    def __repr__(self) -> str:
        return "<ThrottleGroupMember %s>" % self.name


class ThrottleGroup:
    """A throttle group shared by ``throttle`` nodes (block/throttle-groups.c).

    :param name: the group name (the object id).
    :param clock: returns the current time in ns (QEMU_CLOCK_REALTIME by
        default: :func:`time.monotonic_ns`).
    """

    def __init__(self, name: str, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.name = name
        self.clock = clock
        self.lock = threading.Condition(threading.Lock())
        self.ts = ThrottleState()
        #: Round-robin list; QLIST_INSERT_HEAD puts new members first.
        self.members: List[ThrottleGroupMember] = []
        self.tokens: List[Optional[ThrottleGroupMember]] = [None, None]
        self.any_timer_armed = [False, False]

    # -- configuration ------------------------------------------------------

    def config(self, cfg: ThrottleConfig) -> None:
        """throttle_config() under the group lock (throttle_group_set_limits)."""
        with self.lock:
            self.ts.config(cfg, self.clock())
            self.lock.notify_all()

    def get_config(self) -> ThrottleConfig:
        """throttle_group_get_config()."""
        with self.lock:
            return self.ts.get_config()

    # -- membership ---------------------------------------------------------

    def register(self, tgm: ThrottleGroupMember) -> None:
        """throttle_group_register_tgm()."""
        with self.lock:
            tgm.group = self
            for d in (READ, WRITE):
                if self.tokens[d] is None:
                    self.tokens[d] = tgm
            self.members.insert(0, tgm)

    def unregister(self, tgm: ThrottleGroupMember) -> None:
        """throttle_group_unregister_tgm(); the member has no queued request."""
        with self.lock:
            if tgm.group is not self:
                return
            for d in (READ, WRITE):
                if self.tokens[d] is tgm:
                    nxt = self._next_tgm(tgm)
                    self.tokens[d] = None if nxt is tgm else nxt
                if tgm.timers[d] is not None:
                    # throttle_timers_destroy() deletes an armed timer
                    tgm.timers[d] = None
                    self.any_timer_armed[d] = False
                # QEMU asserts the queue is empty (the node was drained);
                # blockd closes nodes at shutdown without draining: let any
                # queued request go rather than wait forever
                for ticket in tgm.queues[d]:
                    ticket.woken = True
                tgm.queues[d] = []
            self.members.remove(tgm)
            tgm.group = None
            now = self.clock()
            for d in (READ, WRITE):
                token = self.tokens[d]
                if token is not None and not self.any_timer_armed[d]:
                    self._schedule_next(token, d, now, in_request=False)
            self.lock.notify_all()

    # -- scheduling (tg->lock held) ----------------------------------------

    def _next_tgm(self, tgm: ThrottleGroupMember) -> ThrottleGroupMember:
        """throttle_group_next_tgm(): the next member, circularly."""
        idx = self.members.index(tgm) + 1
        return self.members[idx] if idx < len(self.members) else self.members[0]

    def _next_token(self, tgm: ThrottleGroupMember, d: int) -> ThrottleGroupMember:
        """next_throttle_token(): the next member with queued requests, or tgm."""
        if tgm.pending_reqs[d] and tgm.io_limits_disabled:
            return tgm
        start = token = self.tokens[d]
        if start is None or start.group is not self:
            return tgm
        token = self._next_tgm(token)
        while token is not start and not token.pending_reqs[d]:
            token = self._next_tgm(token)
        if token is start and not token.pending_reqs[d]:
            token = tgm
        return token

    def _schedule_timer(self, tgm: ThrottleGroupMember, d: int, now: int) -> bool:
        """throttle_group_schedule_timer(): whether tgm's next request must wait."""
        if tgm.io_limits_disabled:
            return False
        if self.any_timer_armed[d]:
            return True
        deadline = self.ts.compute_timer(d, now)
        if deadline is None:
            return False
        if tgm.timers[d] is None:
            tgm.timers[d] = deadline
        self.tokens[d] = tgm
        self.any_timer_armed[d] = True
        return True

    def _restart_queue(self, tgm: ThrottleGroupMember, d: int) -> bool:
        """throttle_group_co_restart_queue(): wake tgm's first queued request."""
        if tgm.queues[d]:
            tgm.queues[d].pop(0).woken = True
            self.lock.notify_all()
            return True
        return False

    def _schedule_next(self, tgm: ThrottleGroupMember, d: int, now: int,
                       in_request: bool) -> None:
        """schedule_next_request(): pick, round-robin, who goes next."""
        token = self._next_token(tgm, d)
        if not token.pending_reqs[d]:
            return
        if not self._schedule_timer(token, d, now):
            if in_request and self._restart_queue(tgm, d):
                token = tgm
            else:
                token.timers[d] = now
                self.any_timer_armed[d] = True
                self.lock.notify_all()
            self.tokens[d] = token

    def _restart(self, tgm: ThrottleGroupMember, d: int, now: int) -> None:
        """throttle_group_restart_queue() and its coroutine."""
        if not self._restart_queue(tgm, d):
            self._schedule_next(tgm, d, now, in_request=False)

    def _fire(self, tgm: ThrottleGroupMember, d: int, now: int) -> None:
        """timer_cb()."""
        tgm.timers[d] = None
        self.any_timer_armed[d] = False
        self._restart(tgm, d, now)

    # -- the request path ---------------------------------------------------

    def submit(self, tgm: ThrottleGroupMember, size: int, is_write: int) -> Optional[Ticket]:
        """First half of throttle_group_co_io_limits_intercept().

        :return: None when the request may run now (it has been accounted), or
            the :class:`Ticket` it waits on; once woken, call :meth:`resume`.
        """
        d = 1 if is_write else 0
        with self.lock:
            now = self.clock()
            token = self._next_token(tgm, d)
            must_wait = self._schedule_timer(token, d, now)
            if must_wait or tgm.pending_reqs[d]:
                tgm.pending_reqs[d] += 1
                ticket = Ticket(tgm, d, size)
                tgm.queues[d].append(ticket)
                return ticket
            self.ts.account(d, size)
            self._schedule_next(tgm, d, now, in_request=True)
            return None

    def resume(self, ticket: Ticket) -> None:
        """Second half of the intercept: a woken request is accounted and the
        next one scheduled."""
        tgm, d = ticket.member, ticket.is_write
        with self.lock:
            tgm.pending_reqs[d] -= 1
            if tgm.group is not self:
                return  # released by unregister()
            self.ts.account(d, ticket.size)
            self._schedule_next(tgm, d, self.clock(), in_request=True)

    def run_timers(self) -> "Optional[int]":
        """Fire every due timer (the event loop's job in QEMU).

        :return: the earliest deadline still armed, or None.
        """
        with self.lock:
            return self._run_timers_locked()

    def _run_timers_locked(self) -> "Optional[int]":
        while True:
            now = self.clock()
            due = [(m.timers[d], i, m, d) for i, m in enumerate(self.members)
                   for d in (READ, WRITE) if m.timers[d] is not None and m.timers[d] <= now]
            if not due:
                break
            _when, _seq, member, d = min(due, key=lambda t: (t[0], t[1], t[3]))
            self._fire(member, d, now)
        pending = [m.timers[d] for m in self.members for d in (READ, WRITE)
                   if m.timers[d] is not None]
        return min(pending) if pending else None

    def _restart_member_locked(self, tgm: ThrottleGroupMember) -> None:
        now = self.clock()
        for d in (READ, WRITE):
            if tgm.timers[d] is not None:
                self._fire(tgm, d, now)
            else:
                self._restart(tgm, d, now)

    def restart_member(self, tgm: ThrottleGroupMember) -> None:
        """throttle_group_restart_tgm(): fire tgm's timers now, or restart its queues."""
        with self.lock:
            self._restart_member_locked(tgm)

    def drain_begin(self, tgm: ThrottleGroupMember) -> None:
        """throttle_co_drain_begin(): stop throttling tgm and release its queue.

        For a drain hook on the node; the driver's own requests notice a
        drain through :meth:`intercept`'s ``bypass`` instead.
        """
        with self.lock:
            tgm.io_limits_disabled += 1
            if tgm.io_limits_disabled == 1:
                self._restart_member_locked(tgm)

    def drain_end(self, tgm: ThrottleGroupMember) -> None:
        """throttle_co_drain_end()."""
        with self.lock:
            tgm.io_limits_disabled -= 1

    def intercept(self, tgm: ThrottleGroupMember, size: int, is_write: int,
                  bypass: "Callable[[], bool] | None" = None,
                  poll: float = 0.1) -> None:
        """throttle_group_co_io_limits_intercept(), blocking the calling thread.

        The thread sleeps until the earliest armed timer of the group; whoever
        wakes first fires the due timers (which wakes the requests whose turn
        it is).  ``bypass`` is checked at least every ``poll`` seconds: while
        it returns True (the graph is being drained) the member's limits are
        lifted, as QEMU's drain does, so a drain never waits for the quota.
        """
        ticket = self.submit(tgm, size, is_write)
        if ticket is None:
            return
        draining = False
        with self.lock:
            while not ticket.woken:
                if bypass is not None and not draining and bypass():
                    # as throttle_co_drain_begin(), but restarting even when
                    # another waiter of tgm already did: a request queued
                    # after that restart must not wait for the old timer
                    draining = True
                    tgm.io_limits_disabled += 1
                    self._restart_member_locked(tgm)
                    continue
                deadline = self._run_timers_locked()
                if ticket.woken:
                    break
                timeout = None if deadline is None else \
                    max(0.0, (deadline - self.clock()) / NANOSECONDS_PER_SECOND)
                if bypass is not None and not draining:
                    timeout = poll if timeout is None else min(timeout, poll)
                self.lock.wait(timeout)
        try:
            self.resume(ticket)
        finally:
            if draining:
                with self.lock:
                    tgm.io_limits_disabled -= 1

    def in_use(self) -> bool:
        """Whether a member still references the group (object-del refuses)."""
        return bool(self.members)
