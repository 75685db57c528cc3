"""blockd.copy.plan: block-aligned copy plans from block status and dirty ranges."""

from blockd.copy.plan import MAX_EXTENT, align_out, intersect, make_plan, merge, subtract

MiB = 1 << 20
HOLE_ZERO, ZERO, DATA = 3, 2, 0


def test_interval_ops():
    assert merge([(5, 6), (0, 2), (2, 3), (10, 10)]) == [(0, 3), (5, 6)]
    assert subtract([(0, 10)], [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert subtract([(0, 4), (6, 9)], [(3, 7)]) == [(0, 3), (7, 9)]
    assert intersect([(0, 4), (6, 9)], [(3, 7)]) == [(3, 4), (6, 7)]
    assert align_out([(MiB + 1, MiB + 3), (3 * MiB - 1, 3 * MiB)], 10 * MiB) == [(MiB, 3 * MiB)]
    assert align_out([(9 * MiB + 5, 10 * MiB)], 9 * MiB + 100) == [(9 * MiB, 9 * MiB + 100)]


def test_full_plan_types_and_alignment():
    size = 8 * MiB + 512
    status = [(0, 4096, DATA), (4096, 3 * MiB, HOLE_ZERO), (3 * MiB + 4096, MiB, ZERO),
              (4 * MiB + 4096, 4 * MiB - 4096, HOLE_ZERO), (8 * MiB, 512, DATA)]
    plan = make_plan(size, status)
    # a run between data blocks is a hole only if block status says hole all along
    assert plan == [(0, MiB, "data"), (MiB, 7 * MiB, "zero"), (8 * MiB, 512, "data")]
    status[2] = (3 * MiB + 4096, MiB, HOLE_ZERO)
    assert make_plan(size, status)[1] == (MiB, 7 * MiB, "hole")
    assert sum(n for _o, n, _k in plan) == size


def test_data_split_and_empty():
    assert make_plan(0, []) == []
    plan = make_plan(200 * MiB, [(0, 200 * MiB, DATA)])
    assert [n for _o, n, _k in plan] == [MAX_EXTENT, MAX_EXTENT, MAX_EXTENT, 8 * MiB]


def test_incremental_plan():
    size = 16 * MiB
    status = [(0, 8 * MiB, DATA), (8 * MiB, 8 * MiB, HOLE_ZERO)]
    plan = make_plan(size, status, dirty=[(MiB + 10, MiB + 20), (9 * MiB, 9 * MiB + 4096)])
    assert plan == [(0, MiB, "unchanged"), (MiB, MiB, "data"), (2 * MiB, 7 * MiB, "unchanged"),
                    (9 * MiB, MiB, "hole"), (10 * MiB, 6 * MiB, "unchanged")]
