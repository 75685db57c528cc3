"""blockdev.fleecing.image through ansible-playbook; the images are checked with qemu-img.

The module writes images with blockd's own code (no engine runs), so these tests
need no daemon; qemu-img info/check and qemu-io judge the result.
"""

import os

import pytest

from helpers import MiB, qemu_img, qemu_io
from helpers.backups import check_qcow2, files, img_info, run_tasks


@pytest.mark.timeout(600)
def test_qcow2_overlay_and_raw_created_once(ansible, tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    base = {"path": str(d / "base.qcow2"), "size": "64M", "cluster_size": "128K"}
    overlay = {"path": str(d / "top.qcow2"), "backing_file": "base.qcow2"}
    raw = {"path": str(d / "disk.raw"), "format": "raw", "size": 1 << 30, "mode": "0640"}

    checked = run_tasks(ansible, {"module": "image", "args": base, "check": True, "diff": True},
                        {"module": "image", "args": raw, "check": True})
    assert files(d) == set(), "check mode wrote something"
    assert checked[0]["changed"] is True and checked[0]["diff"]["before"] == {}, checked[0]
    assert checked[0]["image"] == {"format": "qcow2", "virtual_size": 64 * MiB,
                                   "backing_file": None, "backing_format": None,
                                   "cluster_size": 128 * 1024}, checked[0]
    assert checked[1]["changed"] is True and checked[1]["image"]["virtual_size"] == 1 << 30

    steps = [{"module": "image", "args": a, "diff": True} for a in (base, overlay, raw)]
    first = run_tasks(ansible, *steps)
    for r in first:
        assert not r.get("failed") and r["changed"] is True, r
        assert r["diff"]["before"] == {} and r["diff"]["after"] == r["image"], r
    second = run_tasks(ansible, *steps)
    for r in second:
        assert not r.get("failed") and r["changed"] is False, r
        assert r["diff"]["before"] == r["diff"]["after"], r
    assert files(d) == {"base.qcow2", "top.qcow2", "disk.raw"}  # no temporary file left

    info = img_info(d / "base.qcow2")
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == \
        ("qcow2", 64 * MiB, 128 * 1024)
    check_qcow2(d / "base.qcow2")
    info = img_info(d / "top.qcow2")
    assert info["virtual-size"] == 64 * MiB and info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2" and info["cluster-size"] == 65536
    assert first[1]["image"]["backing_format"] == "qcow2"
    check_qcow2(d / "top.qcow2")
    # the chain works for QEMU: data written into the base shows through the overlay
    qemu_io(d / "base.qcow2", "write -P 0x5a 1M 64k", fmt="qcow2")
    qemu_io(d / "top.qcow2", "read -P 0x5a 1M 64k", "read -P 0 0 64k", fmt="qcow2")
    st = os.stat(d / "disk.raw")
    assert st.st_size == 1 << 30 and st.st_blocks == 0 and st.st_mode & 0o777 == 0o640
    assert img_info(d / "disk.raw")["format"] == "raw"

    # file attributes are managed too: a mode change alone is a change
    r = run_tasks(ansible, {"module": "image", "args": dict(raw, mode="0600")})[0]
    assert r["changed"] is True and os.stat(d / "disk.raw").st_mode & 0o777 == 0o600, r


@pytest.mark.timeout(600)
def test_conflicts_recreate_and_absent(ansible, tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    path = str(d / "a.qcow2")
    qemu_img("create", "-f", "qcow2", path, "32M")
    qemu_io(path, "write -P 0x77 0 1M", fmt="qcow2")
    r = run_tasks(
        ansible,
        {"module": "image", "args": {"path": path, "size": "32M"}},            # same: unchanged
        {"module": "image", "args": {"path": path, "size": "64M"}, "diff": True},
        {"module": "image", "args": {"path": path, "format": "raw"}},
        {"module": "image", "args": {"path": path, "size": "64M", "recreate": True},
         "check": True},
    )
    assert r[0]["changed"] is False and r[0]["image"]["virtual_size"] == 32 * MiB, r[0]
    assert r[1]["failed"] is True and r[1]["msg"] == (
        f"{path} exists and differs (virtual size 33554432, not 67108864): refusing to replace "
        "it; recreate=true replaces it with a new empty image"), r[1]
    assert r[1]["diff"]["before"]["virtual_size"] == 32 * MiB
    assert r[1]["diff"]["after"]["virtual_size"] == 64 * MiB
    assert "format qcow2, not raw" in r[2]["msg"] and r[2]["failed"] is True, r[2]
    assert r[3]["changed"] is True and r[3]["image"]["virtual_size"] == 64 * MiB, r[3]
    # nothing was touched: the data is still there
    assert img_info(path)["virtual-size"] == 32 * MiB
    qemu_io(path, "read -P 0x77 0 1M", fmt="qcow2")

    r = run_tasks(
        ansible,
        {"module": "image", "args": {"path": path, "size": "64M", "recreate": True},
         "diff": True},
        {"module": "image", "args": {"path": path, "state": "absent"}, "check": True},
    )
    assert r[0]["changed"] is True and r[0]["diff"]["before"]["virtual_size"] == 32 * MiB, r[0]
    assert img_info(path)["virtual-size"] == 64 * MiB
    qemu_io(path, "read -P 0 0 1M", fmt="qcow2")  # a new, empty image
    check_qcow2(path)
    assert r[1]["changed"] is True and os.path.exists(path), r[1]

    r = run_tasks(ansible,
                  {"module": "image", "args": {"path": path, "state": "absent"}, "diff": True},
                  {"module": "image", "args": {"path": path, "state": "absent"}})
    assert r[0]["changed"] is True and r[0]["diff"]["after"] == {}, r[0]
    assert r[0]["diff"]["before"]["format"] == "qcow2"
    assert r[1]["changed"] is False and not os.path.exists(path), r[1]


@pytest.mark.timeout(600)
def test_bad_input_one_clear_message_each(ansible, tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    p = str(d / "x.qcow2")
    cases = [
        ({"path": p, "format": "raw", "size": "1M", "backing_file": "b.qcow2"},
         "backing_file: only for qcow2 images, not raw"),
        ({"path": p, "size": "12X"}, "size: '12X' is not a size"),
        ({"path": p}, f"size is required to create {p}"),
        ({"path": p, "size": 1000}, "size: a qcow2 image size must be a multiple of 512 bytes, "
                                    "not 1000"),
        ({"path": p, "backing_file": "nope.qcow2"},
         f"backing_file nope.qcow2 ({d}/nope.qcow2) does not exist"),
        ({"path": p, "size": "1M", "cluster_size": 3000},
         f"cannot create {p}: Cluster size must be a power of two between 512 and 2048k"),
        ({"path": str(d), "size": "1M"}, f"{d} exists and is not a regular file"),
        ({"path": p, "size": "1M", "backing_format": "raw"}, "backing_format needs backing_file"),
        ({"path": str(d / "no" / "dir.qcow2"), "size": "1M"}, "cannot create"),
    ]
    results = run_tasks(ansible, *({"module": "image", "args": a} for a, _m in cases))
    for (args, msg), r in zip(cases, results):
        assert r["failed"] is True and r["changed"] is False, (args, r)
        assert msg in r["msg"], (args, r["msg"])
    assert files(d) == set()
