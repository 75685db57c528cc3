"""Permission checks for new users of a node, and the BDRV_O_UNMAP default (in-process)."""
import pytest

from blockd.errors import QMPError
from blockd.graph import perms
from blockd.graph.backend import Backend


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return str(path)


def conflict(node, other, role="file"):
    return ("Permission conflict on node '%s': permissions 'resize' are both required by an "
            "unnamed block device (uses node '%s' as 'root' child) and unshared by %s (uses node "
            "'%s' as '%s' child)." % (node, node, other, node, role))


def test_perm_names_in_qemu_order():
    assert perms.perm_names({"resize", "write", "consistent-read"}) == \
        "consistent read, write, resize"


def test_raw_passes_its_users_permissions_down(graph, img):
    f = graph.open({"driver": "file", "node-name": "f", "filename": img})
    r = graph.open({"driver": "raw", "node-name": "r", "file": "f"})
    perms.check_new_user(f, {"resize"})            # nobody above r minds
    exp = Backend(graph, r, True, "export", shared=perms.ALL - {"resize"})
    with pytest.raises(QMPError) as exc:
        perms.check_new_user(f, {"resize"})
    assert exc.value.desc == conflict("f", "node 'r'")
    with pytest.raises(QMPError) as exc:
        perms.check_new_user(r, {"resize"})
    assert exc.value.desc == conflict("r", "an unnamed block device", "root")
    exp.detach()
    perms.check_new_user(r, {"resize"})


def test_a_user_of_raw_needs_resize_on_its_file(graph, img):
    f = graph.open({"driver": "file", "node-name": "f", "filename": img})
    graph.open({"driver": "raw", "node-name": "r", "file": "f"})
    Backend(graph, f, False, "export", shared=perms.ALL - {"resize"})
    with pytest.raises(QMPError) as exc:
        perms.check_new_user(graph.find("r"), {"resize"})
    assert exc.value.desc == (
        "Permission conflict on node 'f': permissions 'resize' are both required by node 'r' "
        "(uses node 'f' as 'file' child) and unshared by an unnamed block device (uses node "
        "'f' as 'root' child).")


def test_raw_window_and_formats_never_share_resize(graph, img):
    f = graph.open({"driver": "file", "node-name": "f", "filename": img})
    graph.open({"driver": "raw", "node-name": "w", "file": "f", "offset": 512})
    with pytest.raises(QMPError) as exc:
        perms.check_new_user(f, {"resize"})
    assert exc.value.desc == conflict("f", "node 'w'")
    perms.check_new_user(f, {"write"})             # a DATA child still shares write


def test_read_only_node_refuses_writers(graph, img):
    f = graph.open({"driver": "file", "node-name": "f", "filename": img, "read-only": True})
    perms.check_new_user(f, {"resize"})
    with pytest.raises(QMPError, match="Block node is read-only"):
        perms.check_new_user(f, {"write", "resize"})


def test_unmap_default_is_qemus(graph, img):
    top = graph.open({"driver": "raw", "node-name": "r",
                      "file": {"driver": "file", "filename": img}})
    assert not top.unmap and top.file.unmap        # children inherit BDRV_O_UNMAP
    top2 = graph.open({"driver": "raw", "node-name": "r2", "discard": "unmap",
                       "file": {"driver": "file", "filename": img, "discard": "ignore"}})
    assert top2.unmap and not top2.file.unmap
    f = graph.open({"driver": "file", "node-name": "f", "filename": img})
    assert not f.unmap
