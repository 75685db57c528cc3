"""Compare blockd's JSON Schema (``qmp/schema.json``) with qsd's ``query-qmp-schema``.

Introspection masks type names, so the comparison walks both structures side
by side: member names and order, optionality, enum values, alternates, arrays
and the branches of flat unions that blockd models.
"""

from typing import Any, Dict, List, Tuple

_BUILTIN = {"string": "string", "boolean": "boolean", "int": "integer", "number": "number",
            "null": "null", "value": None}


class SchemaComparison:
    """Walk blockd's schema against the introspection ``entities`` of a qsd."""

    def __init__(self, definitions: Dict[str, Any], entities: List[Dict[str, Any]]) -> None:
        self.definitions = definitions
        self.by = {e["name"]: e for e in entities}
        self.problems: List[Tuple] = []

    def _res(self, js: Dict[str, Any]) -> Dict[str, Any]:
        while "$ref" in js:
            js = self.definitions[js["$ref"].split("/")[-1]]
        return js

    def compare(self, js: Dict[str, Any], iname: str, path: str, depth: int = 0) -> None:
        """Record every difference between ``js`` and introspection type ``iname``."""
        if depth > 12:
            return
        ie = self.by[iname]
        js = self._res(js)
        mt = ie["meta-type"]
        if mt == "builtin":
            exp = _BUILTIN[ie["json-type"]]
            got = js.get("type")
            if exp is None:
                if js:
                    self.problems.append((path, "any", js))
            elif got != exp:
                self.problems.append((path, "builtin", ie["json-type"], js))
        elif mt == "enum":
            if js.get("enum") != ie["values"]:
                self.problems.append((path, "enum", ie["values"], js.get("enum")))
        elif mt == "array":
            self.compare(js.get("items", {}), ie["element-type"], path + "[]", depth + 1)
        elif mt == "alternate":
            alts = js.get("anyOf", [])
            if len(alts) != len(ie["members"]):
                self.problems.append((path, "alternate", len(ie["members"]), len(alts)))
                return
            for alt, member in zip(alts, ie["members"]):
                self.compare(alt, member["type"], path + "|", depth + 1)
        elif mt == "object":
            self._object(js, ie, path, depth)
        else:
            self.problems.append((path, "meta-type", mt))

    def _members(self, props: Dict[str, Any], required: List[str], members: List[Dict[str, Any]],
                 path: str, depth: int) -> None:
        for m in members:
            if (m["name"] in required) == ("default" in m):
                self.problems.append((path + "." + m["name"], "optional"))
            self.compare(props[m["name"]], m["type"], path + "." + m["name"], depth + 1)

    def _object(self, js: Dict[str, Any], ie: Dict[str, Any], path: str, depth: int) -> None:
        props = js.get("properties", {})
        names = [m["name"] for m in ie["members"]]
        if list(props) != names:
            self.problems.append((path, "members", names, list(props)))
            return
        self._members(props, js.get("required", []), ie["members"], path, depth)
        if "variants" not in ie:
            return
        tag = ie["tag"]
        for v in ie["variants"]:
            branch = None
            for case in js.get("allOf", []):
                cond = case["if"]["properties"][tag]
                if v["case"] == cond.get("const") or v["case"] in cond.get("enum", []):
                    branch = self._res(case["then"])
            if branch is None:
                continue  # a branch blockd does not model
            vt = self.by[v["type"]]
            bnames = names + [m["name"] for m in vt["members"]]
            if list(branch["properties"]) != bnames:
                self.problems.append((path + "<" + v["case"], "branch", bnames,
                                      list(branch["properties"])))
                continue
            self._members(branch["properties"], branch.get("required", []), vt["members"],
                          path + "<" + v["case"], depth)

    def command(self, name: str, entry: Dict[str, Any]) -> None:
        """Compare one command's arguments and return type."""
        ie = self.by[name]
        self.compare(entry["args"], ie["arg-type"], name)
        rt = ie["ret-type"]
        ret = entry["returns"]
        if rt.startswith("["):
            self.compare(ret.get("items", {}), rt[1:-1], name + "->[]")
        elif self.by[rt]["meta-type"] == "object" and not self.by[rt]["members"]:
            if ret.get("properties"):
                self.problems.append((name + "->", "empty return", ret))
        else:
            self.compare(ret, rt, name + "->")

    def event(self, name: str, entry: Dict[str, Any]) -> None:
        """Compare one event's data."""
        self.compare(entry["data"], self.by[name]["arg-type"], name)
