#!/usr/bin/env python3
"""Developer tool (not a test): regenerate blockd's ``qmp/schema.json`` from QEMU's QAPI.

``schema.json`` was produced by this script from the QEMU 7.2.0 source tree
(``storage-daemon/qapi/qapi-schema.json`` and the ``qapi/*.json`` it
includes, read with QEMU's own ``scripts/qapi`` parser), then checked member
by member (names, order, optionality, enum values, union branches) against
the introspection of a real qemu-storage-daemon 7.2 (``query-qmp-schema``).

To model more commands or union branches, edit COMMANDS / EVENTS /
EXTRA_TYPES / UNION_CASES below and run::

    python3 tests/unit/qmp/gen_qmp_schema.py QEMU_7.2_SRC \
        plugins/module_utils/blockd/qmp/schema.json QSD_QUERY_QMP_SCHEMA.json

(``QSD_QUERY_QMP_SCHEMA.json`` is the ``return`` of ``query-qmp-schema``
saved from a qsd 7.2.)  Mismatches against the introspection are printed as
``MISMATCH`` lines.  ``TRUE`` lists the build conditionals that are on in
Debian's qsd 7.2 build.
"""
import json
import re
import sys

QEMU = sys.argv[1]
OUT = sys.argv[2]
INTRO = sys.argv[3]
sys.path.insert(0, QEMU + "/scripts")
from qapi.schema import (QAPISchema, QAPISchemaAlternateType,  # noqa: E402
                         QAPISchemaArrayType, QAPISchemaBuiltinType,
                         QAPISchemaEnumType, QAPISchemaObjectType)

TRUE = {"CONFIG_LINUX", "CONFIG_POSIX", "HAVE_HOST_BLOCK_DEVICE", "CONFIG_REPLICATION",
        "CONFIG_LINUX_IO_URING", "CONFIG_FUSE", "CONFIG_VHOST_USER_BLK_SERVER",
        "CONFIG_VDUSE_BLK_EXPORT", "HAVE_IPPROTO_MPTCP", "CONFIG_ZSTD"}

COMMANDS = ["qmp_capabilities", "query-version", "query-commands", "quit",
            "blockdev-add", "blockdev-del", "query-named-block-nodes",
            "nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
            "block-export-add", "block-export-del", "query-block-exports",
            "blockdev-create", "block_resize",
            "query-jobs", "job-pause", "job-resume", "job-cancel", "job-complete",
            "job-dismiss", "job-finalize"]
EVENTS = ["BLOCK_EXPORT_DELETED", "JOB_STATUS_CHANGE"]
EXTRA_TYPES = ["NbdServerOptions", "MonitorOptions"]
# Flat unions whose branches are only partly modelled.  Other unions get all branches.
UNION_CASES = {
    "BlockdevOptions": ["file", "host_cdrom", "host_device", "raw", "null-aio", "null-co",
                        "qcow2", "copy-before-write", "snapshot-access", "throttle"],
    "BlockExportOptions": ["nbd"],
    "BlockdevCreateOptions": ["file", "qcow2"],
}
INT_TYPES = {
    "int": (-2**63, 2**63 - 1), "int64": (-2**63, 2**63 - 1),
    "int8": (-2**7, 2**7 - 1), "int16": (-2**15, 2**15 - 1), "int32": (-2**31, 2**31 - 1),
    "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1), "uint32": (0, 2**32 - 1),
    # QMP's uint64/size visitor also takes negative int64 values (cast).
    "uint64": (-2**63, 2**64 - 1), "size": (-2**63, 2**64 - 1),
}
INT_DOCS = {
    "int": "QAPI 'int' (int64_t).", "int64": "QAPI 'int64'.", "int8": "QAPI 'int8'.",
    "int16": "QAPI 'int16'.", "int32": "QAPI 'int32'.", "uint8": "QAPI 'uint8'.",
    "uint16": "QAPI 'uint16'.", "uint32": "QAPI 'uint32'.",
    "uint64": "QAPI 'uint64'; like QEMU, negative int64 values are accepted (cast).",
    "size": "QAPI 'size' (uint64_t; suffixes k/M/G/T/P/E on the command line).",
}


def ok(ifcond):
    if ifcond is None:
        return True
    c = ifcond.ifcond if hasattr(ifcond, "ifcond") else ifcond
    if c is None:
        return True
    if isinstance(c, str):
        return c in TRUE
    if "all" in c:
        return all(ok(x) for x in c["all"])
    if "any" in c:
        return any(ok(x) for x in c["any"])
    if "not" in c:
        return not ok(c["not"])
    raise ValueError(c)


schema = QAPISchema(QEMU + "/storage-daemon/qapi/qapi-schema.json")
docs = {d.symbol: d for d in schema.docs if d.symbol}
defs = {}
order = []


def para(text):
    text = (text or "").strip()
    if not text:
        return ""
    first = re.split(r"\n\s*\n", text)[0]
    return " ".join(first.split())


def member_doc(owner, mname):
    d = docs.get(owner)
    if d and mname in d.args and d.args[mname].text:
        return para(d.args[mname].text)
    return ""


def ref(name):
    return {"$ref": "#/definitions/" + name}


def type_schema(t):
    """Schema node referring to QAPI type t."""
    if isinstance(t, QAPISchemaBuiltinType):
        n = t.name
        if n == "str":
            return {"type": "string"}
        if n == "bool":
            return {"type": "boolean"}
        if n == "number":
            return {"type": "number"}
        if n == "null":
            return {"type": "null"}
        if n == "any":
            return {}
        if n in INT_TYPES:
            define_int(n)
            return ref(n)
        raise ValueError(n)
    if isinstance(t, QAPISchemaArrayType):
        return {"type": "array", "items": type_schema(t.element_type)}
    define(t)
    return ref(t.name)


def define_int(n):
    if n in defs:
        return
    lo, hi = INT_TYPES[n]
    defs[n] = {"description": INT_DOCS[n], "type": "integer", "minimum": lo, "maximum": hi}
    order.append(n)


def members_schema(members, owner_of):
    props = {}
    req = []
    for m in members:
        if not ok(m.ifcond):
            continue
        s = dict(type_schema(m.type))
        d = member_doc(owner_of(m), m.name)
        if d:
            s["description"] = d
        feats = [f.name for f in m.features]
        if feats:
            s["x-features"] = feats
        props[m.name] = s
        if not m.optional:
            req.append(m.name)
    return props, req


def owner_name(m):
    o = m.defined_in
    mt = re.match(r"q_obj_(.*)-(base|arg)$", o)
    return mt.group(1) if mt else o


def define(t):
    name = t.name
    if name in defs:
        return
    defs[name] = None  # placeholder against recursion
    order.append(name)
    desc = para(docs[name].body.text) if name in docs else ""
    if isinstance(t, QAPISchemaEnumType):
        vals = [m.name for m in t.members if ok(m.ifcond)]
        d = {"type": "string", "enum": vals}
    elif isinstance(t, QAPISchemaAlternateType):
        d = {"anyOf": [type_schema(v.type) for v in t.variants.variants if ok(v.ifcond)]}
    elif isinstance(t, QAPISchemaObjectType):
        if t.variants:
            tag = t.variants.tag_member.name
            base = [m for m in t.members]
            props, req = members_schema(base, owner_name)
            d = {"type": "object", "properties": props, "required": req}
            cases = UNION_CASES.get(name)
            groups = {}
            for v in t.variants.variants:
                if not ok(v.ifcond):
                    continue
                if cases is not None and v.name not in cases:
                    continue
                if v.type.name == "q_empty":
                    groups.setdefault(None, []).append(v.name)
                    continue
                groups.setdefault(v.type.name, []).append(v.name)
            allof = []
            for vt, vcases in groups.items():
                bname = name + ":" + (vt if vt else "empty")
                if bname not in defs:
                    vmembers = schema.lookup_entity(vt).members if vt else []
                    bprops, breq = members_schema(list(base) + list(vmembers), owner_name)
                    bdoc = para(docs[vt].body.text) if vt and vt in docs else ""
                    defs[bname] = {"description": ("Branch %s of %s: %s" % (
                        "/".join(vcases), name, bdoc)).strip(),
                        "type": "object", "properties": bprops, "required": breq,
                        "additionalProperties": False}
                    order.append(bname)
                cond = {"enum": vcases} if len(vcases) > 1 else {"const": vcases[0]}
                allof.append({"if": {"properties": {tag: cond}, "required": [tag]},
                              "then": ref(bname)})
            d["allOf"] = allof
        else:
            props, req = members_schema(t.members, owner_name)
            d = {"type": "object", "properties": props, "required": req,
                 "additionalProperties": False}
    else:
        raise ValueError(t)
    if desc:
        d = dict({"description": desc}, **d)
    defs[name] = d


def args_schema(cmd_or_ev):
    at = cmd_or_ev.arg_type
    if at is None:
        return {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
    if at.is_implicit():
        props, req = members_schema(at.members, owner_name)
        return {"type": "object", "properties": props, "required": req,
                "additionalProperties": False}
    return type_schema(at)


def cmd_doc(name):
    d = docs.get(name)
    if d is None:
        return ""
    text = para(d.body.text)
    if not text:
        for sec in d.sections:
            if sec.text.strip():
                text = para("%s: %s" % (sec.name, sec.text)) if sec.name else para(sec.text)
                break
    return text


out_cmds = {}
for c in COMMANDS:
    e = schema.lookup_entity(c)
    ent = {"args": args_schema(e)}
    if e.ret_type is None:
        ent["returns"] = {"type": "object", "properties": {}, "additionalProperties": False}
    else:
        ent["returns"] = type_schema(e.ret_type)
    ent["doc"] = cmd_doc(c)
    feats = [f.name for f in e.features]
    if feats:
        ent["features"] = feats
    out_cmds[c] = ent
out_evs = {}
for ev in EVENTS:
    e = schema.lookup_entity(ev)
    ent = {"data": args_schema(e), "doc": para(docs[ev].body.text) if ev in docs else ""}
    out_evs[ev] = ent
for t in EXTRA_TYPES:
    define(schema.lookup_entity(t))

doc = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$comment": ("QMP command schema of qemu-storage-daemon 7.2 for blockd, generated from "
                 "QEMU 7.2.0 qapi/*.json (storage-daemon/qapi/qapi-schema.json) and checked "
                 "against the daemon's query-qmp-schema. Integer QAPI types are the "
                 "definitions int, int8..int64, uint8..uint64 and size; alternates are anyOf "
                 "definitions; flat unions carry one allOf if/then per modelled branch, each "
                 "branch a complete object (base + branch members) named '<Union>:<Type>'."),
    "definitions": {k: defs[k] for k in sorted(order, key=lambda n: (n not in INT_TYPES, n))},
    "commands": out_cmds,
    "events": out_evs,
}

# ---- cross-check against introspection -------------------------------------------------
S = json.load(open(INTRO))
by = {e["name"]: e for e in S}
root = {"definitions": doc["definitions"]}


def res(s):
    while "$ref" in s:
        s = root["definitions"][s["$ref"].split("/")[-1]]
    return s


problems = []


def cmp(js, iname, path, depth=0):
    if depth > 12:
        return
    ie = by[iname]
    js = res(js)
    mt = ie["meta-type"]
    if mt == "builtin":
        jt = ie["json-type"]
        exp = {"string": "string", "boolean": "boolean", "int": "integer", "number": "number",
               "null": "null", "value": None}[jt]
        if js.get("type") != exp:
            problems.append((path, "builtin", jt, js))
        return
    if mt == "enum":
        if js.get("enum") != ie["values"]:
            problems.append((path, "enum", ie["values"], js.get("enum")))
        return
    if mt == "array":
        cmp(js["items"], ie["element-type"], path + "[]", depth + 1)
        return
    if mt == "alternate":
        if len(js["anyOf"]) != len(ie["members"]):
            problems.append((path, "alt-len"))
            return
        for a, m in zip(js["anyOf"], ie["members"]):
            cmp(a, m["type"], path + "|", depth + 1)
        return
    if mt == "object":
        props = js["properties"]
        names = [m["name"] for m in ie["members"]]
        if list(props) != names:
            problems.append((path, "members", names, list(props)))
            return
        for m in ie["members"]:
            if (m["name"] in js.get("required", [])) == ("default" in m):
                problems.append((path + "." + m["name"], "optional"))
            cmp(props[m["name"]], m["type"], path + "." + m["name"], depth + 1)
        if "variants" in ie:
            tag = ie["tag"]
            for v in ie["variants"]:
                br = None
                for a in js.get("allOf", []):
                    c = a["if"]["properties"][tag]
                    if v["case"] == c.get("const") or v["case"] in c.get("enum", []):
                        br = res(a["then"])
                if br is None:
                    continue
                vt = by[v["type"]]
                bnames = names + [m["name"] for m in vt["members"]]
                if list(br["properties"]) != bnames:
                    problems.append((path + "<" + v["case"], "branch", bnames, list(br["properties"])))
                    continue
                for m in vt["members"]:
                    cmp(br["properties"][m["name"]], m["type"], path + "<" + v["case"] + "." + m["name"], depth + 1)
        return
    problems.append((path, "meta", mt))


for c in COMMANDS:
    ie = by[c]
    cmp(out_cmds[c]["args"], ie["arg-type"], c)
    rt = ie["ret-type"]
    r = out_cmds[c]["returns"]
    if rt.startswith("["):
        cmp(r["items"], rt[1:-1], c + "->[]")
    elif by[rt]["meta-type"] == "object" and by[rt]["members"] == []:
        pass
    else:
        cmp(r, rt, c + "->")
for ev in EVENTS:
    cmp(out_evs[ev]["data"], by[ev]["arg-type"], ev)
for p in problems:
    print("MISMATCH", p)
with open(OUT, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
print("definitions:", len(doc["definitions"]), "problems:", len(problems))
