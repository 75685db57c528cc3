"""Hostile QMP input against the real daemons: each case gets an error reply (or
a dropped connection) and neither that connection's later commands, another
monitor, nor the data path are affected."""

import pytest

from helpers import MiB, make_raw_image, nbdcopy

MONITORS = ["--chardev", "socket,path=m0.sock,server=on,wait=off,id=m0", "--monitor", "chardev=m0",
            "--chardev", "socket,path=m1.sock,server=on,wait=off,id=m1", "--monitor", "chardev=m1"]

CASES = {
    "garbage": b"\x00\x01\xff\xfe}}]]::,,",
    "invalid-utf8": b'{"execute": "query-version", "id": "\xc3\x28"}',
    "deep-nesting": b"[" * 2000 + b"]" * 2000,
    "huge-string": b'{"execute": "query-version", "id": "' + b"x" * (8 << 20) + b'"}',
    "unknown-args": b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "z",'
                    b' "size": {"nested": [1, 2, {"x": null}]}}}',
    "many-objects": b'{"execute": "query-version"}' * 2000,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_leaves_daemon_and_others_alone(daemon, engine, tmp_path, case):
    img = make_raw_image(tmp_path / "disk.raw", 4 * MiB, b"\x42")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=raw,node-name=disk,file=f",
               "--export", "type=nbd,id=e,node-name=disk,name=disk", *MONITORS, qmp=False, nbd=True)
    with d.raw_qmp(monitor=0, timeout=60) as bad:
        bad.negotiate()
        bad.send(CASES[case])
        bad.send(b'{"execute": "query-version", "id": "probe"}')
        # read replies until the probe's; every reply before it is a reply or an error
        for _ in range(5000):
            try:
                msg = bad.recv_msg(timeout=60)
            except ConnectionError:
                break  # dropping a hostile client is allowed
            assert "return" in msg or "error" in msg or "event" in msg, msg
            if msg.get("id") == "probe":
                assert "return" in msg
                break
    # another monitor and an NBD client are unaffected
    with d.raw_qmp(monitor=1) as good:
        good.negotiate()
        assert "return" in good.execute("query-version")
        assert [n["node-name"] for n in good.execute("query-named-block-nodes",
                                                     {"flat": True})["return"]
                if not n["node-name"].startswith("#")] == ["disk", "f"]
    nbdcopy(d.nbd_uri("disk"), tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == img.read_bytes()
    assert d.alive()


def test_token_over_qemus_limit_is_refused(daemon):
    """A 70 MiB string passes QEMU's 64 MiB token limit: an error, then business as usual.

    (blockd only: qsd takes minutes to lex that much input.)"""
    d = daemon("blockd", "--blockdev", "driver=null-co,node-name=n", *MONITORS, qmp=False)
    with d.raw_qmp(monitor=0, timeout=120) as q:
        q.negotiate()
        q.send(b'{"execute": "query-version", "id": "' + b"x" * (70 << 20) + b'"}')
        # As in QEMU, lexing resumes after the over-long token, so the payload's
        # closing quote opens a string: close it, then the stream is in step again.
        q.send(b'"{"execute": "query-version", "id": "probe"}')
        errors = 0
        while True:
            msg = q.recv_msg(timeout=120)
            if msg.get("id") == "probe":
                assert "return" in msg
                break
            assert msg["error"]["class"] == "GenericError", msg
            errors += 1
        assert errors >= 1
    assert d.alive()
