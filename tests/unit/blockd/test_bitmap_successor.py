"""Successor bitmaps (a backup's frozen bitmap) and the copy-bitmap initialisation of
sync=bitmap, in-process.

Expected values follow QEMU 7.2's block/dirty-bitmap.c (create_successor / abdicate /
reclaim) and block/backup.c backup_init_bcs_bitmap(): a copy-bitmap cluster is dirty iff the
sync bitmap has a dirty bit inside it, whatever the two granularities.
"""

import pytest

from blockd.graph import dirty_bitmap as dbm
from blockd.graph.blockcopy import ClusterBitmap
from blockd.jobs.backup import _areas, _reset_clean_clusters
from blockd.nbd.export import DirtyBitmapContext

K = 1024
K64 = 64 * K
SIZE = 4 * 1024 * K


class FakeNode:
    """Just enough of a node for dirty_bitmap.attach() (no driver: no write tracking)."""

    def __init__(self, size=SIZE):
        self.size = size
        self.parents = []

    def getlength(self):
        return self.size


def areas(bitmap, end=SIZE):
    return list(_areas(bitmap, end))


@pytest.mark.parametrize("granularity,dirty,expected", [
    (K64, [(0, 1), (K64 * 3, 5)], [(0, K64), (3 * K64, K64)]),
    (4 * K, [(K64 - 4 * K, 4 * K), (K64, 4 * K)], [(0, 2 * K64)]),
    (4 * K, [(5 * K64 + 8 * K, 100)], [(5 * K64, K64)]),
    (128 * K, [(K64 * 3, 1)], [(2 * K64, 2 * K64)]),
    (512, [(SIZE - 512, 512)], [(SIZE - K64, K64)]),
    (K64, [], []),
    (K64, [(0, SIZE)], [(0, SIZE)]),
])
def test_copy_bitmap_from_sync_bitmap(granularity, dirty, expected):
    sync = dbm.DirtyBitmap(SIZE, granularity, "b0")
    for off, n in dirty:
        sync.set(off, n)
    copy = ClusterBitmap(SIZE, K64)
    copy.set_all()
    _reset_clean_clusters(copy, K64, sync, SIZE)
    assert areas(copy) == expected


def test_a_cluster_copied_meanwhile_stays_clean():
    sync = dbm.DirtyBitmap(SIZE, K64, "b0")
    sync.set(0, 4 * K64)
    copy = ClusterBitmap(SIZE, K64)
    copy.set_all()
    copy.reset(K64, K64)       # the filter copied it before the job ran
    _reset_clean_clusters(copy, K64, sync, SIZE)
    assert areas(copy) == [(0, K64), (2 * K64, 2 * K64)]


def test_successor_abdicate_and_reclaim():
    node = FakeNode()
    b0 = dbm.create(node, "b0", K64)
    b0.persistent = True
    b0.set(0, K64)
    child = dbm.create_successor(b0)
    assert (b0.busy, b0.enabled, child.enabled, child.name) == (True, False, True, None)
    assert b0.query_info()["recording"] is True
    with pytest.raises(Exception, match="currently in use"):
        dbm.create_successor(b0)
    child.set(2 * K64, 1)
    assert dbm.bitmaps_of(node) == [b0, child]
    # reclaim: the successor's bits merged back, recording again
    assert dbm.reclaim(b0) is b0
    assert (b0.busy, b0.enabled, b0.count(), b0.successor) == (False, True, 2 * K64, None)
    assert dbm.bitmaps_of(node) == [b0]
    # abdicate: the successor takes the name and the persistence
    child = dbm.create_successor(b0)
    child.set(3 * K64, 1)
    new = dbm.abdicate(b0)
    assert new is child and dbm.find(node, "b0") is child
    assert (new.persistent, new.busy, new.enabled, new.count()) == (True, False, True, K64)
    assert dbm.bitmaps_of(node) == [child] and b0.node is None


def test_disabled_bitmap_successor_is_disabled():
    node = FakeNode()
    b0 = dbm.create(node, "b0", K64)
    b0.enabled = False
    child = dbm.create_successor(b0)
    assert child.enabled is False and b0.query_info()["recording"] is False
    dbm.reclaim(b0)
    assert b0.enabled is False


@pytest.mark.parametrize("offset,length,limit,expected", [
    (0, SIZE, 100, [(K64, 0), (2 * K64, 1), (SIZE - 3 * K64, 0)]),
    (K64 + 5, K64, 100, [(K64, 1)]),
    (3 * K64 - 5, 10, 100, [(5, 1), (5, 0)]),
    (2 * K64 + 1, 10, 100, [(10, 1)]),
    (0, SIZE, 1, [(K64, 0)]),
    (K64, SIZE - K64, 1, [(2 * K64, 1)]),
    (5 * K64, K64, 100, [(K64, 0)]),
])
def test_dirty_bitmap_context_extents(offset, length, limit, expected):
    b0 = dbm.DirtyBitmap(SIZE, K64, "b0")
    b0.set(K64, 2 * K64)
    ctx = DirtyBitmapContext("b0", 2, b0)
    assert ctx.name == "qemu:dirty-bitmap:b0"
    assert ctx.extents(None, offset, length, limit).as_list() == expected
