# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``transaction``, ``blockdev-snapshot-sync`` and ``blockdev-snapshot``.

QEMU 7.2's ``qmp_transaction()`` (blockdev.c): every action of the list is
*prepared* in order; if one fails, every action prepared so far -- the
failing one included, as QEMU inserts an action before preparing it -- is
*aborted* in reverse order and the failing action's error is the reply;
otherwise every action is *committed* in order.  Either way every action is
*cleaned* in order at the end.  The whole transaction runs with I/O drained
(``graph.gate.drained()``), so all actions see one point in time.

Actions are data: :data:`ACTIONS` maps a ``TransactionActionKind`` to an
:class:`ActionDrv` (QEMU's ``BlkActionOps``: prepare/commit/abort/clean and
the completion modes the action accepts).  Adding an action is one
:func:`register` call.  ``completion-mode=grouped`` puts the jobs the
actions create in one :class:`~blockd.jobs.JobTxn`; an action that does not
support it fails its prepare with QEMU's ``Action 'x' does not support
Transaction property completion-mode = grouped``.

``blockdev-snapshot-sync`` and ``blockdev-snapshot`` are, as in QEMU
(``blockdev_do_action()``), one-action transactions.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional

from ..errors import QMPError
from ..graph.snapshot import ExternalSnapshot
from . import command

LOG = logging.getLogger(__name__)


class ActionState:
    """One action of a running transaction (QEMU's ``BlkActionState``).

    :param daemon: the daemon.
    :param kind: the action type (``blockdev-snapshot-sync``...).
    :param data: the action's validated arguments.
    :param txn: the shared :class:`~blockd.jobs.JobTxn` (grouped), else None.
    :param mode: the transaction's completion mode.
    """

    def __init__(self, daemon: Any, kind: str, data: Dict[str, Any], txn: Any,
                 mode: str) -> None:
        self.daemon = daemon
        self.kind = kind
        self.data = data
        self.txn = txn
        self.mode = mode
        #: Whatever prepare needs commit/abort/clean to see (a job, a snapshot...).
        self.priv: Any = None


Step = Callable[[ActionState], None]


def _nothing(state: ActionState) -> None:
    """A step with nothing to do."""


class ActionDrv(NamedTuple):
    """QEMU's ``BlkActionOps`` for one action type.

    :param prepare: checks and undoable changes; raises QMPError on failure.
    :param commit: makes the change final (must not fail).
    :param abort: undoes prepare, also a partial one.
    :param clean: runs last, after commit or abort.
    :param modes: the completion modes the action supports; for the others
        its prepare fails first thing (QEMU's ``action_check_completion_mode``).
        None: the action does not check (QEMU's ``abort``, ``*-backup``).
    """

    prepare: Step
    commit: Step = _nothing
    abort: Step = _nothing
    clean: Step = _nothing
    modes: Optional[FrozenSet[str]] = frozenset({"individual"})


#: TransactionActionKind -> its driver.
ACTIONS: Dict[str, ActionDrv] = {}


def register(kind: str, drv: ActionDrv) -> None:
    """Make ``kind`` a transaction action (replacing any earlier driver)."""
    ACTIONS[kind] = drv


def check_completion_mode(state: ActionState, drv: ActionDrv) -> None:
    """``action_check_completion_mode()``."""
    if drv.modes is not None and state.mode not in drv.modes:
        raise QMPError("Action '%s' does not support Transaction property completion-mode = %s"
                       % (state.kind, state.mode))


def _drain_all_flap(daemon: Any) -> None:
    """``bdrv_drain_all()`` as block jobs see it (they pause and resume)."""
    try:
        from ..jobs.blockjob import drain_all_flap
    except ImportError:  # pragma: no cover - the block job core is optional here
        return
    drain_all_flap(daemon)


def run_transaction(daemon: Any, actions: List[Dict[str, Any]],
                    properties: Optional[Dict[str, Any]] = None) -> None:
    """``qmp_transaction()``: all actions or none.

    :param daemon: the daemon (its big lock is held by the caller).
    :param actions: ``[{type, data}]`` as validated by the schema.
    :param properties: ``TransactionProperties``.
    :raise QMPError: the failing action's error, after every prepared
        action was aborted.
    """
    mode = (properties or {}).get("completion-mode", "individual")
    txn = None
    if mode != "individual":
        from ..jobs import JobTxn
        txn = JobTxn()
    _drain_all_flap(daemon)
    states: List[ActionState] = []
    with daemon.graph.gate.drained():
        try:
            try:
                for action in actions:
                    kind = action["type"]
                    drv = ACTIONS.get(kind)
                    if drv is None:
                        raise QMPError("Transaction action '%s' is not supported by blockd"
                                       % kind)
                    state = ActionState(daemon, kind, action.get("data", {}), txn, mode)
                    states.append(state)
                    check_completion_mode(state, drv)
                    drv.prepare(state)
            except BaseException:
                for state in reversed(states):
                    _step(state, "abort")
                raise
            for state in states:
                _step(state, "commit")
        finally:
            for state in states:
                _step(state, "clean")


def _step(state: ActionState, name: str) -> None:
    """Run commit, abort or clean of one action.  They cannot fail in QEMU; a
    bug in one must not keep the others from running (nor hide the error of
    the failing prepare), so it is logged."""
    try:
        getattr(ACTIONS[state.kind], name)(state)
    except Exception:  # pylint: disable=broad-except
        LOG.exception("transaction: %s of action %s failed", name, state.kind)


def do_action(daemon: Any, kind: str, data: Dict[str, Any]) -> None:
    """``blockdev_do_action()``: one action as a transaction of its own."""
    run_transaction(daemon, [{"type": kind, "data": data}])


# -- abort ----------------------------------------------------------------------------

def _abort_prepare(state: ActionState) -> None:
    """``abort_prepare()``: always fails (it checks no completion mode)."""
    raise QMPError("Transaction aborted using Abort action")


register("abort", ActionDrv(prepare=_abort_prepare, modes=None))


# -- external snapshots -------------------------------------------------------------

def _snapshot_prepare(state: ActionState) -> None:
    """``external_snapshot_prepare()`` (see :mod:`blockd.graph.snapshot`)."""
    state.priv = ExternalSnapshot(state.daemon, state.kind, state.data)
    state.priv.prepare()


def _snapshot_commit(state: ActionState) -> None:
    state.priv.commit()


def _snapshot_abort(state: ActionState) -> None:
    if state.priv is not None:
        state.priv.abort()


def _snapshot_clean(state: ActionState) -> None:
    if state.priv is not None:
        state.priv.clean()


_SNAPSHOT = ActionDrv(prepare=_snapshot_prepare, commit=_snapshot_commit,
                      abort=_snapshot_abort, clean=_snapshot_clean)
register("blockdev-snapshot-sync", _SNAPSHOT)
register("blockdev-snapshot", _SNAPSHOT)


# -- blockdev-backup ------------------------------------------------------------------

def _backup_prepare(state: ActionState) -> None:
    """``blockdev_backup_prepare()``: the job is created, not started."""
    from . import backup
    prepare = getattr(backup, "backup_prepare", None)
    if prepare is None:
        raise QMPError("Transaction action 'blockdev-backup' is not supported by blockd")
    state.priv = prepare(state.daemon, state.data, state.txn)


def _backup_commit(state: ActionState) -> None:
    """``blockdev_backup_commit()``: ``job_start()``.

    The source's drained section, opened by prepare, stays open: it ends in
    clean, after every action committed (qsd's events: each job shows
    ``running, paused`` at its commit and ``running`` again at its clean).
    """
    job = state.priv
    if not hasattr(job, "end_prepare_drain"):
        job.start()
        return
    # job_start() alone: the job class's own start() would end the drain too
    super(type(job), job).start()
    # QEMU enters the job's coroutine in job_start(): it runs to its first pause
    # point (paused: its source is drained) before the next action commits
    with job.lock:
        deadline = time.monotonic() + 15
        while job.busy and not job.is_completed and time.monotonic() < deadline:
            job.cond.wait(0.05)


def _backup_abort(state: ActionState) -> None:
    """``blockdev_backup_abort()``: the unstarted job is cancelled
    (created, aborting, concluded, null)."""
    if state.priv is not None:
        state.priv.cancel(True)


def _backup_clean(state: ActionState) -> None:
    """``blockdev_backup_clean()``: the source's drained section ends."""
    end = getattr(state.priv, "end_prepare_drain", None)
    if end is not None:
        end()


register("blockdev-backup", ActionDrv(prepare=_backup_prepare, commit=_backup_commit,
                                      abort=_backup_abort, clean=_backup_clean, modes=None))


# -- actions blockd answers without doing them ---------------------------------------

def _lookup_device(state: ActionState, key: str = "device") -> Any:
    """``bdrv_lookup_bs(device, device)``."""
    name = state.data[key]
    return state.daemon.graph.lookup(name, device=name)


def _drive_backup_prepare(state: ActionState) -> None:
    """``drive_backup_prepare()`` up to the node lookup; blockd creates no targets."""
    _lookup_device(state)
    raise QMPError("drive-backup is not supported by blockd; use blockdev-backup")


def _internal_snapshot_prepare(state: ActionState) -> None:
    """``internal_snapshot_prepare()`` up to the node lookup."""
    _lookup_device(state)
    raise QMPError("Internal snapshots are not supported by blockd")


register("drive-backup", ActionDrv(prepare=_drive_backup_prepare, modes=None))
register("blockdev-snapshot-internal-sync", ActionDrv(prepare=_internal_snapshot_prepare))


from . import bitmaps as _bm  # noqa: E402 - the real dirty bitmap actions

register("block-dirty-bitmap-add", ActionDrv(prepare=_bm.add_prepare, abort=_bm.add_abort))
register("block-dirty-bitmap-remove", ActionDrv(prepare=_bm.remove_prepare,
                                                commit=_bm.remove_commit, abort=_bm.remove_abort))
register("block-dirty-bitmap-clear", ActionDrv(prepare=_bm.clear_prepare, abort=_bm.restore_abort))
register("block-dirty-bitmap-enable", ActionDrv(prepare=_bm.enable_prepare, abort=_bm.toggle_abort))
register("block-dirty-bitmap-disable", ActionDrv(prepare=_bm.disable_prepare,
                                                 abort=_bm.toggle_abort))
register("block-dirty-bitmap-merge", ActionDrv(prepare=_bm.merge_prepare, abort=_bm.restore_abort))


# -- commands -------------------------------------------------------------------------

@command("transaction")
def transaction(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Run the actions all-or-nothing (see the module doc)."""
    run_transaction(daemon, args["actions"], args.get("properties"))
    return {}


@command("blockdev-snapshot-sync")
def blockdev_snapshot_sync(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Create a qcow2 overlay over a node and make it the new top."""
    do_action(daemon, "blockdev-snapshot-sync", args)
    return {}


@command("blockdev-snapshot")
def blockdev_snapshot(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Make an existing node the new top of ``node`` (its backing)."""
    do_action(daemon, "blockdev-snapshot", args)
    return {}
