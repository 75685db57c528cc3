"""blockdev.fleecing.blockd: the engine as a service (detached daemon; no systemd here)."""

import os
from pathlib import Path

from helpers import MiB, make_raw_image


def _alive(pid):
    """Running (a zombie whose parent has not reaped it yet is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_blockd_started_is_idempotent_and_restarts_on_new_settings(ansible, service, tmp_path):
    checked = ansible.module("blockd", service, check=True)
    assert checked["changed"] is True and not checked["failed"], checked
    assert not Path(service["install_dir"]).exists() and not Path(service["socket"]).exists()

    first = ansible.module("blockd", service, diff=True)
    assert first["changed"] is True and not first["failed"], first
    assert first["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert "blockd" in first["version"]["package"]
    assert _alive(first["pid"]) and first["diff"]["before"] == {}
    assert first["install_path"].startswith(service["install_dir"] + "/0.1.0-")
    assert Path(first["nbd_socket"]).is_socket()

    again = ansible.module("blockd", service)
    assert again["changed"] is False and again["pid"] == first["pid"], again
    info = ansible.module("blockd_info", {"socket": service["socket"]})
    assert info["nodes"] == [] and not info["failed"]

    img = make_raw_image(tmp_path / "disk.img", MiB)
    newargs = dict(service, args=["--blockdev", f"driver=file,node-name=disk0,filename={img}"])
    restarted = ansible.module("blockd", newargs, diff=True)
    assert restarted["changed"] is True and restarted["pid"] != first["pid"], restarted
    assert not _alive(first["pid"])
    assert restarted["diff"]["before"]["args"] == [] and restarted["diff"]["after"]["args"][0] == "--blockdev"
    info = ansible.module("blockd_info", {"socket": service["socket"], "gather": ["nodes"]})
    assert [n["node-name"] for n in info["nodes"]] == ["disk0"]

    stopped = ansible.module("blockd", dict(newargs, state="stopped"))
    assert stopped["changed"] is True and "pid" not in stopped
    assert not _alive(restarted["pid"])
    assert ansible.module("blockd", dict(newargs, state="stopped"))["changed"] is False

    gone = ansible.module("blockd", dict(newargs, state="absent"))
    assert gone["changed"] is True and os.listdir(service["install_dir"]) == []
    assert ansible.module("blockd", dict(newargs, state="absent"))["changed"] is False


def test_qemu_storage_daemon_as_the_engine(ansible, service):
    args = dict(service, engine="qemu-storage-daemon")
    first = ansible.module("blockd", args)
    assert first["changed"] is True and not first["failed"], first
    assert "install_path" not in first and not Path(service["install_dir"]).exists()
    with open(f"/proc/{first['pid']}/cmdline", "rb") as f:
        assert b"qemu-storage-daemon" in f.read()
    assert ansible.module("blockd", args)["changed"] is False
    assert ansible.module("blockd", dict(args, state="stopped"))["changed"] is True
    assert not _alive(first["pid"])


def test_engine_that_cannot_start_fails_with_its_log(ansible, service):
    bad = dict(service, args=["--blockdev", "driver=file,node-name=d,filename=/nonexistent/x.img"])
    res = ansible.module("blockd", bad, timeout=120)
    assert res["failed"] is True
    assert "did not answer" in res["msg"] and "/nonexistent/x.img" in res["msg"], res["msg"]
    assert not Path(service["run_dir"], "engine.json").exists()


def test_internal_options_cannot_be_set_by_the_user(ansible, service):
    res = ansible.module("blockd", dict(service, _engine_archive="/etc/passwd",
                                        _engine_sha256="0" * 64, _engine_version="9"))
    assert not res["failed"], res   # the action plugin drops them and sends the real engine
    assert res["install_path"].startswith(service["install_dir"] + "/0.1.0-")
    assert ansible.module("blockd", dict(service, state="absent"))["changed"] is True


def test_interpreter_without_jsonschema_is_named(ansible, service, tmp_path):
    import subprocess
    bare = tmp_path / "bare-venv"   # a Python that sees only the standard library
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    res = ansible.module("blockd", dict(service, python=str(bare / "bin" / "python3")))
    assert res["failed"] is True
    assert res["msg"].startswith("blockd needs the Python package jsonschema, which "
                                 f"{bare}/bin/python3 cannot import"), res["msg"]
    assert not Path(service["run_dir"], "engine.json").exists()
