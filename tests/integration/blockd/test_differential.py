"""Differential test: one QMP sequence against qemu-storage-daemon and blockd.

Both engines start from identical images and command lines; every reply,
error and event of the sequence is compared, then what NBD clients see of the
exports (contents, allocation map, capabilities).
"""

import hashlib
import json

from helpers import MiB, make_raw_image, nbd_uri, nbdcopy, nbdinfo_json, qemu_io, run

SIZE = 8 * MiB

#: What query-named-block-nodes members a client can rely on in both engines.
NODE_KEYS = ("node-name", "drv", "ro", "backing_file_depth", "detect_zeroes", "cache", "encrypted")
IMAGE_KEYS = ("virtual-size", "format")


def normalise(command, value):
    """The parts of a return value that must be equal between engines."""
    if command == "query-named-block-nodes":
        nodes = []
        for node in value:
            entry = {k: node[k] for k in NODE_KEYS}
            entry["image"] = {k: node["image"][k] for k in IMAGE_KEYS}
            # generated names differ in their numbers only
            if entry["node-name"].startswith("#block"):
                entry["node-name"] = "#block"
            nodes.append(entry)
        return sorted(nodes, key=lambda n: (n["node-name"], n["drv"]))
    if command == "query-version":
        return sorted(value)
    if command == "query-commands":
        return None  # blockd offers a subset; checked elsewhere
    return value


def sequence(workdir):
    """The commands (name, arguments) both engines run, in order."""
    img = str(workdir / "disk.raw")
    return [
        ("query-version", {}),
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img}),
        ("blockdev-add", {"driver": "raw", "node-name": "disk", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "disk", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "win", "file": "f0", "offset": 1048576,
                          "size": 2097152}),
        ("blockdev-add", {"driver": "raw", "node-name": "bad", "file": "f0", "offset": 1048576,
                          "size": SIZE}),
        ("blockdev-add", {"driver": "null-co", "node-name": "zero", "size": 4194304, "read-zeroes": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "inl",
                          "file": {"driver": "null-co", "size": 65536}}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "nope"}}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": {"driver": "file"}}),
        ("query-named-block-nodes", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk", "writable": True}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(workdir / "nbd.sock")}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(workdir / "nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "win", "name": "window"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "zero", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "disk"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "inl"}),
        ("nbd-server-add", {"device": "inl", "name": "legacy"}),
        ("query-block-exports", {}),
        ("blockdev-del", {"node-name": "disk"}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "nothere"}),
        ("nbd-server-remove", {"name": "legacy"}),
        ("nbd-server-remove", {"name": "legacy"}),
        ("blockdev-del", {"node-name": "inl"}),
        ("block-export-del", {"id": "e9"}),
        ("query-block-exports", {}),
    ]


def run_sequence(d, workdir):
    q = d.qmp
    outcomes = []
    for name, args in sequence(workdir):
        reply = q.cmd_raw(name, args)
        if "error" in reply:
            outcomes.append((name, "error", reply["error"]["class"], reply["error"]["desc"]))
        else:
            outcomes.append((name, "return", normalise(name, reply["return"])))
    events = [(e["event"], e.get("data")) for e in q.get_events()]
    return outcomes, events


def nbd_view(sock, tmp_path, tag):
    """What an NBD client sees: contents digest, allocation map, flags."""
    out = tmp_path / f"{tag}.raw"
    view = {}
    for name in ("disk", "window", "zero"):
        uri = nbd_uri(sock, name)
        nbdcopy(uri, out)
        data = out.read_bytes()
        view[name + ".sha256"] = hashlib.sha256(data).hexdigest()
        info = nbdinfo_json(uri)["exports"][0]
        view[name + ".info"] = {k: info[k] for k in ("export-size", "is_read_only", "can_flush", "can_fua",
                                                     "can_trim", "can_zero", "can_multi_conn")}
        mapping = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
        view[name + ".map"] = _map_is_sound(mapping, data)
    return view


def test_same_sequence_same_answers(daemon, tmp_path):
    results = {}
    for kind in ("qsd", "blockd"):
        work = tmp_path / f"w-{kind}"
        work.mkdir()
        make_raw_image(work / "disk.raw", SIZE, b"\x5a")
        d = daemon(kind, cwd=work)
        outcomes, events = run_sequence(d, work)
        # writes through NBD: data, zeroes (with and without punching), discard
        qemu_io(nbd_uri(work / "nbd.sock", "disk"), "write -P 0xab 0 64k", "write -P 0xcd 1000 3000", "write -z 1M 512k",
                "write -z -u 3M 1M", "discard 5M 1M", "flush")
        view = nbd_view(work / "nbd.sock", tmp_path, kind)
        results[kind] = (outcomes, events, view)
        d.qmp.cmd("nbd-server-stop")
        d.quit()
        results[kind] += (hashlib.sha256((work / "disk.raw").read_bytes()).hexdigest(),)

    qsd, blockd = results["qsd"], results["blockd"]
    for i, (expected, got) in enumerate(zip(qsd[0], blockd[0])):
        assert got == expected, f"command #{i} {expected[0]}: qsd {expected[1:]} != blockd {got[1:]}"
    assert blockd[1] == qsd[1], "events differ"
    for key in qsd[2]:
        assert blockd[2][key] == qsd[2][key], key
    assert blockd[3] == qsd[3], "image files differ after quit"


def _map_is_sound(entries, data):
    """The allocation map covers the export and every "zero" extent reads as zeroes.

    Exact extents are not compared between engines: ext4 answers SEEK_DATA for
    unwritten extents by what the page cache holds at that moment.
    """
    end = 0
    for e in entries:
        assert e["offset"] == end, entries
        end += e["length"]
        if e["type"] & 2:
            assert data[e["offset"]:end] == bytes(e["length"]), e
    assert end == len(data)
    return True
