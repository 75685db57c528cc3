#!/usr/bin/env python3
"""Developer tool (not a test): add commands to blockd's ``qmp/schema.json`` from qsd's introspection.

``gen_qmp_schema.py`` builds the schema from QEMU's QAPI sources.  When those are
not at hand, this tool extends the schema from what a real qemu-storage-daemon 7.2
answers to ``query-qmp-schema``: structure, member order, optionality and enum
values come from the daemon itself, so they cannot drift from it.  Introspection
masks the names of types (``"95"``) and has no documentation, so the names
(QEMU's QAPI names) and one-line docs are given below by hand; types whose
structure equals an existing definition reuse that definition.  Integer members
appear as ``int`` (introspection does not tell int8..uint64 apart).

    python3 tests/unit/qmp/gen_qmp_schema_intro.py QSD_QUERY_QMP_SCHEMA.json \\
        plugins/module_utils/blockd/qmp/schema.json

The test ``tests/integration/blockd/test_qmp_schema_qsd.py`` checks every command
and event of the schema against a live qsd, whichever tool produced it.
"""
import json
import sys

INTRO, OUT = sys.argv[1], sys.argv[2]

COMMANDS = {
    "blockdev-backup": "Start a point-in-time copy of a block device to a new destination.",
    "query-block-jobs": "Return information about long-running block device operations.",
    "block-job-set-speed": "Set maximum speed for a background block operation.",
    "block-job-cancel": "Stop an active background block operation.",
    "block-job-pause": "Pause an active background block operation.",
    "block-job-resume": "Resume an active background block operation.",
    "block-job-complete": "Manually trigger completion of an active background block operation.",
    "block-job-dismiss": "For jobs that have already concluded, remove them from the block-job-query list.",
    "block-job-finalize": "Once a job that has manual=true reaches the pending state, it can be "
                          "instructed to finalize any graph changes and do any necessary cleanup via "
                          "this command.",
    "transaction": "Executes a number of transactionable QMP commands atomically. If any operation "
                   "fails, then the entire set of actions will be abandoned and the appropriate error "
                   "returned.",
    "blockdev-snapshot-sync": "Takes a synchronous snapshot of a block device.",
    "blockdev-snapshot": "Takes a snapshot of a block device. Take a snapshot, by installing 'node' "
                         "as the backing image of 'overlay'. Additionally, if 'node' is associated "
                         "with a block device, the block device changes to using 'overlay' as its new "
                         "active image.",
    "object-add": "Create a QOM object.",
    "object-del": "Remove a QOM object.",
    "qom-get": "This command will get a property from a object model path and return the value.",
    "qom-set": "This command will set a property from a object model path.",
    "qom-list": "This command will list any properties of a object given a path in the object "
                "model.",
    "block-dirty-bitmap-add": "Create a dirty bitmap with a name on the node, and start tracking the "
                              "writes.",
    "block-dirty-bitmap-remove": "Stop write tracking and remove the dirty bitmap that was created "
                                 "with block-dirty-bitmap-add. If the bitmap is persistent, remove "
                                 "it from its storage too.",
    "block-dirty-bitmap-clear": "Clear (reset) a dirty bitmap on the device, so that an incremental "
                                "backup from this point in time forward will only backup clusters "
                                "modified after this clear operation.",
    "block-dirty-bitmap-enable": "Enables a dirty bitmap so that it will begin tracking disk changes.",
    "block-dirty-bitmap-disable": "Disables a dirty bitmap so that it will stop tracking disk "
                                  "changes.",
    "block-dirty-bitmap-merge": "Merge dirty bitmaps listed in @bitmaps to the @target dirty bitmap. "
                                "Dirty bitmaps in @bitmaps will be unchanged, except if it also "
                                "appears as the @target bitmap. Any bits already set in @target will "
                                "still be set after the merge, i.e., this operation does not clear "
                                "the target. On error, @target is unchanged.",
}
EVENTS = {
    "BLOCK_JOB_COMPLETED": "Emitted when a block job has completed.",
    "BLOCK_JOB_CANCELLED": "Emitted when a block job has been cancelled.",
    "BLOCK_JOB_ERROR": "Emitted when a block job encounters an error.",
    "BLOCK_JOB_READY": "Emitted when a block job is ready to complete.",
    "BLOCK_JOB_PENDING": "Emitted when a block job is awaiting explicit authorization to finalize "
                         "graph changes via @block-job-finalize. If this job is part of a "
                         "transaction, it will not emit this event until the transaction has "
                         "converged first.",
}
#: Where a masked type is met (command arguments/returns, event data, or
#: ``Owner.member``) -> its QAPI name.
NAMES = {
    "blockdev-backup": "BlockdevBackup",
    "BlockdevBackup.sync": "MirrorSyncMode",
    "BlockdevBackup.bitmap-mode": "BitmapSyncMode",
    "BlockdevBackup.on-source-error": "BlockdevOnError",
    "BlockdevBackup.x-perf": "BackupPerf",
    "query-block-jobs->": "BlockJobInfo",
    "BlockJobInfo.io-status": "BlockDeviceIoStatus",
    "BlockJobInfo.status": "JobStatus",
    "block-job-set-speed": "q_obj_block-job-set-speed-arg",
    "transaction": "q_obj_transaction-arg",
    "q_obj_transaction-arg.actions": "TransactionAction",
    "q_obj_transaction-arg.properties": "TransactionProperties",
    "TransactionProperties.completion-mode": "ActionCompletionMode",
    "TransactionAction.type": "TransactionActionKind",
    "blockdev-snapshot-sync": "BlockdevSnapshotSync",
    "BlockdevSnapshotSync.mode": "NewImageMode",
    "blockdev-snapshot": "BlockdevSnapshot",
    "object-add": "ObjectOptions",
    "ObjectOptions.qom-type": "ObjectType",
    "qom-list->": "ObjectPropertyInfo",
    "block-dirty-bitmap-add": "BlockDirtyBitmapAdd",
    "block-dirty-bitmap-remove": "BlockDirtyBitmap",
    "block-dirty-bitmap-merge": "BlockDirtyBitmapMerge",
    "BLOCK_JOB_ERROR.operation": "IoOperationType",
    "BLOCK_JOB_ERROR.action": "BlockErrorAction",
    "BlockdevSnapshotSync.format": "BlockdevDriver",
}
#: Transaction action wrappers and union branches: variant case -> type name.
CASE_NAMES = {
    "TransactionAction": {
        "abort": "AbortWrapper", "block-dirty-bitmap-add": "BlockDirtyBitmapAddWrapper",
        "block-dirty-bitmap-remove": "BlockDirtyBitmapWrapper",
        "block-dirty-bitmap-clear": "BlockDirtyBitmapWrapper",
        "block-dirty-bitmap-enable": "BlockDirtyBitmapWrapper",
        "block-dirty-bitmap-disable": "BlockDirtyBitmapWrapper",
        "block-dirty-bitmap-merge": "BlockDirtyBitmapMergeWrapper",
        "blockdev-backup": "BlockdevBackupWrapper", "blockdev-snapshot": "BlockdevSnapshotWrapper",
        "blockdev-snapshot-internal-sync": "BlockdevSnapshotInternalWrapper",
        "blockdev-snapshot-sync": "BlockdevSnapshotSyncWrapper",
        "drive-backup": "DriveBackupWrapper",
    },
    "ObjectOptions": {"throttle-group": "ThrottleGroupProperties",
                      "secret": "SecretProperties", "iothread": "IothreadProperties",
                      "tls-creds-x509": "TlsCredsX509Properties",
                      "authz-simple": "AuthZSimpleProperties"},
}
WRAPPED = {"AbortWrapper": "Abort", "BlockDirtyBitmapAddWrapper": "BlockDirtyBitmapAdd",
           "BlockDirtyBitmapWrapper": "BlockDirtyBitmap",
           "BlockDirtyBitmapMergeWrapper": "BlockDirtyBitmapMerge",
           "BlockdevBackupWrapper": "BlockdevBackup", "BlockdevSnapshotWrapper": "BlockdevSnapshot",
           "BlockdevSnapshotInternalWrapper": "BlockdevSnapshotInternal",
           "BlockdevSnapshotSyncWrapper": "BlockdevSnapshotSync",
           "DriveBackupWrapper": "DriveBackup"}
MORE_NAMES = {
    "ThrottleGroupProperties.limits": "ThrottleLimits",
    "SecretProperties.format": "QCryptoSecretFormat",
    "TlsCredsX509Properties.endpoint": "QCryptoTLSCredsEndpoint",
    "DriveBackup.sync": "MirrorSyncMode", "DriveBackup.mode": "NewImageMode",
    "DriveBackup.format": "BlockdevDriver",
    "BlockDirtyBitmapMerge.bitmaps": "BlockDirtyBitmapOrStr",
}
NAMES.update(MORE_NAMES)

S = json.load(open(INTRO))
by = {e["name"]: e for e in S}
doc = json.load(open(OUT))
defs = doc["definitions"]
unnamed = []


def same_structure(existing, built):
    """Whether an existing definition has the shape introspection gives."""
    if "enum" in built:
        return existing.get("enum") == built["enum"]
    if "properties" in built:
        return (list(existing.get("properties", {})) == list(built["properties"])
                and sorted(existing.get("required", [])) == sorted(built["required"]))
    return False


def find_existing(built):
    for name, d in defs.items():
        if d and ":" not in name and same_structure(d, built):
            return name
    return None


def conv(tid, path):
    """JSON Schema for introspection type ``tid`` met at ``path``."""
    e = by[tid]
    mt = e["meta-type"]
    if mt == "builtin":
        return {"string": {"type": "string"}, "boolean": {"type": "boolean"},
                "int": {"$ref": "#/definitions/int"}, "number": {"type": "number"},
                "null": {"type": "null"}, "value": {}}[e["json-type"]]
    if mt == "array":
        return {"type": "array", "items": conv(e["element-type"], path)}
    if mt == "alternate":
        name = NAMES.get(path)
        body = {"anyOf": [conv(m["type"], path + "|") for m in e["members"]]}
        if name is None:
            return body
        defs.setdefault(name, body)
        return {"$ref": "#/definitions/" + name}
    if mt == "enum":
        body = {"type": "string", "enum": list(e["values"])}
    else:
        body = None
    name = NAMES.get(path)
    if name is None and mt == "enum":
        name = find_existing(body)
    if name is None and mt == "object":
        probe = {"properties": {m["name"]: 1 for m in e["members"]},
                 "required": [m["name"] for m in e["members"] if "default" not in m]}
        name = find_existing(probe)
    if name is None:
        name = "T" + tid
        unnamed.append((path, tid))
    if name in defs and defs[name] is not None:
        return {"$ref": "#/definitions/" + name}
    if mt == "enum":
        defs[name] = body
        return {"$ref": "#/definitions/" + name}
    defs[name] = None  # recursion guard
    props, req = {}, []
    for m in e["members"]:
        props[m["name"]] = conv(m["type"], name + "." + m["name"])
        if "features" in m:
            props[m["name"]]["x-features"] = m["features"]
        if "default" not in m:
            req.append(m["name"])
    body = {"type": "object", "properties": props, "required": req}
    if "variants" in e:
        tag = e["tag"]
        cases = CASE_NAMES.get(name, {})
        allof = []
        for v in e["variants"]:
            vname = cases.get(v["case"])
            if vname is None:
                continue
            bname = name + ":" + vname
            vt = by[v["type"]]
            if bname not in defs:
                bprops = dict(props)
                breq = list(req)
                for m in vt["members"]:
                    sub = vname if vname not in WRAPPED else vname
                    if vname in WRAPPED and m["name"] == "data":
                        NAMES[sub + ".data"] = WRAPPED[vname]
                    bprops[m["name"]] = conv(m["type"], sub + "." + m["name"])
                    if "default" not in m:
                        breq.append(m["name"])
                defs[bname] = {"description": "Branch %s of %s." % (v["case"], name),
                               "type": "object", "properties": bprops, "required": breq,
                               "additionalProperties": False}
            allof.append({"if": {"properties": {tag: {"const": v["case"]}}, "required": [tag]},
                          "then": {"$ref": "#/definitions/" + bname}})
        body["allOf"] = allof
    else:
        body["additionalProperties"] = False
    defs[name] = body
    return {"$ref": "#/definitions/" + name}


EMPTY = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
for cname, cdoc in COMMANDS.items():
    e = by[cname]
    at = by[e["arg-type"]]
    if at["meta-type"] == "object" and not at["members"]:
        args = dict(EMPTY)
    elif cname in NAMES and at["meta-type"] == "object" and "variants" not in at \
            and NAMES[cname].startswith("q_obj_"):
        # implicit argument type: inline, like gen_qmp_schema.py does
        inner = conv(e["arg-type"], cname)
        args = defs.pop(inner["$ref"].split("/")[-1])
        for k, v in args["properties"].items():
            if v.get("$ref", "").endswith("/T" + e["arg-type"]):
                pass
    else:
        NAMES.setdefault(cname, None)
        if NAMES[cname] is None:
            del NAMES[cname]
            inner = conv(e["arg-type"], cname)
            ref = inner["$ref"].split("/")[-1]
            if ref.startswith("T"):
                args = defs.pop(ref)
                unnamed[:] = [u for u in unnamed if u[1] != e["arg-type"]]
            else:
                args = inner
        else:
            args = conv(e["arg-type"], cname)
    rt = e["ret-type"]
    if by[rt]["meta-type"] == "object" and not by[rt]["members"]:
        ret = {"type": "object", "properties": {}, "additionalProperties": False}
    else:
        ret = conv(rt, cname + "->")
    ent = {"args": args, "returns": ret, "doc": cdoc}
    doc["commands"][cname] = ent
for ename, edoc in EVENTS.items():
    e = by[ename]
    # event data are implicit types: inline, members named after the event
    at = by[e["arg-type"]]
    props, req = {}, []
    for m in at["members"]:
        props[m["name"]] = conv(m["type"], ename + "." + m["name"])
        if "default" not in m:
            req.append(m["name"])
    doc["events"][ename] = {"data": {"type": "object", "properties": props, "required": req,
                                     "additionalProperties": False}, "doc": edoc}
for path, tid in unnamed:
    print("UNNAMED", path, tid, by[tid].get("meta-type"), [m.get("name") for m in by[tid].get("members", [])][:8] if by[tid].get("members") else by[tid].get("values"))
doc["definitions"] = {k: defs[k] for k in sorted(defs, key=lambda n: (n not in ("int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"), n))}
with open(OUT, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
print("commands:", len(doc["commands"]), "events:", len(doc["events"]), "definitions:", len(doc["definitions"]))
