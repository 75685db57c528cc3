"""blockdev.fleecing.throttle_group against both engines, through ansible-playbook."""

from helpers import MiB, make_raw_image
from helpers.backups import run_tasks


def limits(d, name):
    """The group's limits as the engine reports them (qom-get)."""
    return d.qmp.cmd("qom-get", path=f"/objects/{name}", property="limits")


def objects(d):
    """Names of the engine's user-created objects."""
    reply = d.qmp.cmd_raw("qom-list", {"path": "/objects"})
    if "error" in reply:          # qsd has no /objects before its first object
        assert reply["error"]["class"] == "DeviceNotFound", reply
        return []
    return sorted(o["name"] for o in reply["return"] if o["type"].startswith("child<"))


def test_throttle_group_add_change_in_use_absent(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", 4 * MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=f0,filename={img}")
    args = {"socket": sock, "name": "tg0", "limits": {"bps-total": 1 << 20, "iops-total": 100}}
    res = run_tasks(ansible,
                    {"module": "throttle_group", "args": args, "check": True, "diff": True},
                    {"module": "throttle_group", "args": args, "diff": True},
                    {"module": "throttle_group", "args": args, "diff": True},
                    {"module": "throttle_group",
                     "args": {**args, "limits": {"bps-total": 0, "bps-read": 4096}},
                     "check": True, "diff": True},
                    {"module": "throttle_group",
                     "args": {**args, "limits": {"bps-total": 0, "bps-read": 4096}}, "diff": True},
                    {"module": "throttle_group",
                     "args": {**args, "limits": {"bps-total": 0, "bps-read": 4096}}})
    assert not any(r.get("failed") for r in res), res
    checked, first, second, ccheck, change, change2 = res
    assert checked["changed"] is True and checked["diff"]["before"] == {}, checked
    assert checked["limits"]["bps-total"] == 1 << 20 and checked["limits"]["iops-read"] == 0
    assert first["changed"] is True and first["limits"] == checked["limits"], first
    assert second["changed"] is False and second["actions"] == [], second
    # only the given keys are set: iops-total stays 100
    assert ccheck["changed"] is True and ccheck["actions"][0]["type"] == "qom-set", ccheck
    assert change["changed"] is True and change["diff"]["before"]["bps-total"] == 1 << 20
    assert change["diff"]["after"] == ccheck["diff"]["after"], (change, ccheck)
    assert change2["changed"] is False, change2
    now = limits(d, "tg0")
    assert (now["bps-total"], now["bps-read"], now["iops-total"]) == (0, 4096, 100)
    assert change["limits"] == now

    # in use by a throttle node: deleting fails and changes nothing; then it goes
    d.qmp.cmd("blockdev-add", driver="throttle", **{"node-name": "th0", "throttle-group": "tg0",
                                                    "file": "f0"})
    gone = {"socket": sock, "name": "tg0", "state": "absent"}
    in_use = run_tasks(ansible, {"module": "throttle_group", "args": gone})[0]
    assert in_use.get("failed") and "object 'tg0' is in use" in in_use["msg"], in_use
    assert objects(d) == ["tg0"] and limits(d, "tg0") == now
    d.qmp.cmd("blockdev-del", **{"node-name": "th0"})
    res = run_tasks(ansible,
                    {"module": "throttle_group", "args": gone, "check": True, "diff": True},
                    {"module": "throttle_group", "args": gone},
                    {"module": "throttle_group", "args": gone})
    assert not any(r.get("failed") for r in res), res
    assert res[0]["changed"] is True and res[0]["diff"]["after"] == {}
    assert res[1]["changed"] is True and res[2]["changed"] is False
    assert objects(d) == []


def test_throttle_group_bad_input(engine_with_monitor, ansible, tmp_path):
    d, sock = engine_with_monitor()
    res = run_tasks(
        ansible,
        {"module": "throttle_group", "args": {"socket": sock, "name": "t", "limits": {"bps": 1}}},
        {"module": "throttle_group", "args": {"socket": sock, "name": "t",
                                              "limits": {"bps-total": "fast"}}},
        {"module": "throttle_group", "args": {"socket": sock, "name": "t",
                                              "limits": {"bps-total": -1}}},
        {"module": "throttle_group", "args": {"socket": sock, "name": "t",
                                              "limits": {"bps-total-max": 10}}},
        {"module": "throttle_group", "args": {"socket": sock, "name": "t", "state": "absent",
                                              "limits": {"bps-total": 1}}},
    )
    assert all(r.get("failed") for r in res), res
    assert "unknown key(s) bps;" in res[0]["msg"]
    assert "bps-total must be an integer" in res[1]["msg"]
    assert "must be within [0, 1000000000000000]" in res[2]["msg"]
    assert "bps_max/iops_max require corresponding bps/iops values" in res[3]["msg"]
    assert "only with state=present" in res[4]["msg"]
    assert objects(d) == []
