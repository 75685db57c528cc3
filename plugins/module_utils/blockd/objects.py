# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""User-creatable objects and the part of QEMU's QOM tree a client can see.

qsd's tree has a root container with, once used, ``/chardevs`` (one child per
``--chardev``) and ``/objects`` (one child per ``object-add``/``--object``).
``object-add``, ``--object``, ``object-del``, ``qom-get``, ``qom-set`` and
``qom-list`` all go through :class:`ObjectTree`, which follows
``qom/object_interfaces.c`` (user_creatable_add_type, user_creatable_del) and
``qom/object.c`` (path resolution, property errors).

Listing order: qom-list shows an object's properties in the reverse of
QEMU's iteration order -- the object's own properties (a container's
children, in GLib hash-table order, which :class:`GHashSet` replays), then
its class's, then the parent classes' (``type`` last, so it comes first).

Object types: ``throttle-group`` (a real :class:`ThrottleGroup` used by
``throttle`` nodes), ``tls-creds-x509`` (an :class:`ssl.SSLContext` loaded
from its ``dir``, used by ``nbd-server-start tls-creds=``), ``authz-simple``
(the one client identity ``tls-authz`` lets in), ``secret`` (also a
``tls-creds-x509``'s key password) and ``iothread`` (its properties are kept;
blockd has no use for it).  Every other type qsd 7.2 knows is refused with
QEMU's "invalid object type" text.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import DeviceNotFound, QMPError
from .graph.throttle import (BPS_READ, BPS_TOTAL, BPS_WRITE, OPS_READ, OPS_TOTAL, OPS_WRITE,
                             UINT_MAX, ThrottleGroup)
from .qmp.qjson import qdict_order
from .qmp.visitor import GHashSet, QapiVisitor, VisitError

#: Types blockd creates (the others qsd has are refused).
OBJECT_TYPES = ("authz-simple", "iothread", "secret", "throttle-group", "tls-creds-x509")

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def id_wellformed(oid: str) -> bool:
    """id_wellformed(): letters, digits, ``-``, ``.``, ``_``; a letter first."""
    return bool(_ID_RE.match(oid))


class QOMObject:
    """A QOM object: a type name and typed properties.

    Subclasses set :attr:`type_name` and :attr:`class_props` (name -> QOM
    type, in qom-list order without ``type``) and implement :meth:`get_prop`
    and :meth:`set_prop`.
    """

    type_name = "object"
    class_props: Tuple[Tuple[str, str], ...] = ()
    #: Properties without a setter ("not writable").
    read_only_props: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self.parent: Optional["Container"] = None
        self.name = ""

    def path(self) -> str:
        """object_get_canonical_path()."""
        if self.parent is None:
            return "/"
        parent = self.parent.path()
        return (parent if parent != "/" else "") + "/" + self.name

    def children(self) -> List[Tuple[str, "QOMObject"]]:
        """child<> properties in QEMU's iteration order."""
        return []

    def prop_list(self) -> List[Dict[str, str]]:
        """qmp_qom_list(): ObjectPropertyInfo entries as qsd orders them."""
        own = [{"name": name, "type": "child<%s>" % child.type_name}
               for name, child in self.children()]
        own.reverse()
        return [{"name": "type", "type": "string"}] + \
            [{"name": n, "type": t} for n, t in self.class_props] + own

    def find_prop(self, name: str) -> Optional[str]:
        """The QOM type of property ``name``, or None."""
        if name == "type":
            return "string"
        for pname, ptype in self.class_props:
            if pname == name:
                return ptype
        for cname, child in self.children():
            if cname == name:
                return "child<%s>" % child.type_name
        return None

    def get(self, name: str) -> Any:
        """object_property_get_qobject()."""
        ptype = self.find_prop(name)
        if ptype is None:
            raise QMPError("Property '%s.%s' not found" % (self.type_name, name))
        if name == "type":
            return self.type_name
        if ptype.startswith("child<"):
            return dict(self.children())[name].path()
        return self.get_prop(name)

    def set(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        """object_property_set_qobject(): ``visitor(qom_type, name, value)``
        checks the value like QEMU's input visitor."""
        ptype = self.find_prop(name)
        if ptype is None:
            raise QMPError("Property '%s.%s' not found" % (self.type_name, name))
        if name == "type" or ptype.startswith("child<") or name in self.read_only_props:
            raise QMPError("Property '%s.%s' is not writable" % (self.type_name, name))
        self.set_prop(name, value, visitor)

    def get_prop(self, name: str) -> Any:
        raise NotImplementedError

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        raise NotImplementedError

    # -- user creatable -----------------------------------------------------

    def complete(self) -> None:
        """user_creatable_complete(); raise QMPError on failure."""

    def can_be_deleted(self) -> bool:
        """user_creatable_can_be_deleted()."""
        return True

    def finalize(self) -> None:
        """The object is gone (instance_finalize)."""


class Container(QOMObject):
    """A ``container`` object; its children's order is a GLib hash table's."""

    type_name = "container"

    def __init__(self) -> None:
        super().__init__()
        self._children: Dict[str, QOMObject] = {}
        self._order = GHashSet()

    def children(self) -> List[Tuple[str, QOMObject]]:
        return [(k, self._children[k]) for k in self._order.keys if k is not None]

    def child(self, name: str) -> Optional[QOMObject]:
        return self._children.get(name)

    def add_child(self, name: str, obj: QOMObject) -> None:
        """object_property_try_add_child()."""
        if name in self._children:
            raise QMPError("attempt to add duplicate property '%s' to object (type '%s')"
                           % (name, self.type_name))
        self._children[name] = obj
        self._order.insert(name)
        obj.parent, obj.name = self, name

    def del_child(self, name: str) -> None:
        """object_property_del() of a child<> property."""
        obj = self._children.pop(name)
        self._order.remove(name)
        obj.parent = None


class Chardev(QOMObject):
    """A ``--chardev socket`` (chardev-socket's ``addr`` and ``connected``).

    :param addr: the SocketAddress qom-get shows.
    :param connected: tells whether a client is connected.
    """

    type_name = "chardev-socket"
    class_props = (("connected", "bool"), ("addr", "SocketAddress"))
    read_only_props = ("connected", "addr")

    def __init__(self, addr: Dict[str, Any], connected: Callable[[], bool]) -> None:
        super().__init__()
        self.addr = addr
        self.connected = connected

    def get_prop(self, name: str) -> Any:
        return dict(self.addr) if name == "addr" else self.connected()


def socket_address(opts: Dict[str, Any], sock: Any) -> Dict[str, Any]:
    """char_socket_get_addr(): the listening address as a SocketAddress."""
    if "path" in opts:
        return {"path": opts["path"], "type": "unix"}
    try:
        name = sock.getsockname()
    except OSError:
        name = None
    if isinstance(name, tuple):
        out: Dict[str, Any] = {"port": str(name[1])}
        out["ipv6" if sock.family == socket.AF_INET6 else "ipv4"] = True
        out["host"] = name[0]
        out["type"] = "inet"
        return out
    if isinstance(name, str):
        return {"path": name, "type": "unix"}
    return {"str": str(opts.get("fd", "")), "type": "fd"}


class SecretObject(QOMObject):
    """``secret``: the data is kept; nothing in blockd reads it yet."""

    type_name = "secret"
    class_props = (("iv", "string"), ("keyid", "string"), ("loaded", "bool"),
                   ("format", "QCryptoSecretFormat"), ("file", "string"), ("data", "string"))
    read_only_props = ("loaded",)

    def __init__(self) -> None:
        super().__init__()
        self.values: Dict[str, Any] = {"iv": "", "keyid": "", "loaded": False,
                                       "format": "raw", "file": "", "data": ""}

    def get_prop(self, name: str) -> Any:
        return self.values[name]

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        ptype = dict(self.class_props)[name]
        self.values[name] = visitor({"bool": "boolean", "QCryptoSecretFormat":
                                     "QCryptoSecretFormat"}.get(ptype, "str"), name, value)

    def complete(self) -> None:
        """qcrypto_secret_load_data() and the base64 check of qcrypto_secret_complete()."""
        data, path = self.values["data"], self.values["file"]
        if data and path:
            raise QMPError("'file' and 'data' are mutually exclusive")
        if not data and not path:
            raise QMPError("Either 'file' or 'data' must be provided")
        if path:
            try:
                with open(path, "rb") as handle:
                    handle.read()
            except OSError as exc:
                raise QMPError("Unable to read %s: Failed to open file \u201c%s\u201d: %s"
                               % (path, path, exc.strerror)) from None
        elif self.values["format"] == "base64" and not _BASE64_RE.match(data):
            raise QMPError("Base64 data contains invalid characters")
        self.values["loaded"] = True


_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


class TLSCredsX509Object(QOMObject):
    """``tls-creds-x509`` (crypto/tlscredsx509.c): the credentials are loaded
    into :attr:`context` when the object is completed.

    :param tree: the object tree (``passwordid`` names a ``secret`` in it).
    """

    type_name = "tls-creds-x509"
    class_props = (("endpoint", "QCryptoTLSCredsEndpoint"), ("dir", "string"),
                   ("verify-peer", "bool"), ("priority", "string"), ("sanity-check", "bool"),
                   ("passwordid", "string"), ("loaded", "bool"))
    read_only_props = ("loaded",)
    _TYPES = {"QCryptoTLSCredsEndpoint": "QCryptoTLSCredsEndpoint", "bool": "boolean"}

    def __init__(self, tree: "ObjectTree") -> None:
        super().__init__()
        self.tree = tree
        self.values: Dict[str, Any] = {"endpoint": "client", "dir": "", "verify-peer": True,
                                       "priority": "", "sanity-check": True, "passwordid": ""}
        #: The loaded context (None until completed).
        self.context: Any = None

    @property
    def endpoint(self) -> str:
        """``"server"`` or ``"client"``."""
        return str(self.values["endpoint"])

    def get_prop(self, name: str) -> Any:
        if name == "loaded":
            return self.context is not None
        return self.values[name]

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        self.values[name] = visitor(self._TYPES.get(dict(self.class_props)[name], "str"),
                                    name, value)

    def complete(self) -> None:
        """qcrypto_tls_creds_x509_complete() -> qcrypto_tls_creds_x509_load()."""
        from .nbd.tls import load_x509
        password = None
        if self.values["passwordid"]:
            password = self.tree.secret_text(self.values["passwordid"])
        self.context = load_x509(self.values["dir"], self.endpoint,
                                 bool(self.values["verify-peer"]),
                                 bool(self.values["sanity-check"]), password)


class AuthzSimpleObject(QOMObject):
    """``authz-simple`` (authz/simple.c): allows exactly one identity (for
    TLS, a client certificate's distinguished name, e.g. ``CN=client``)."""

    type_name = "authz-simple"
    class_props = (("identity", "string"),)

    def __init__(self) -> None:
        super().__init__()
        self.identity: Optional[str] = None

    def get_prop(self, name: str) -> Any:
        return self.identity or ""

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        self.identity = visitor("str", name, value)

    def complete(self) -> None:
        """qauthz_simple_complete()."""
        if self.identity is None:
            raise QMPError("The 'identity' property must be set")

    def is_allowed(self, identity: str) -> bool:
        """qauthz_simple_is_allowed()."""
        return identity == self.identity


class IOThreadObject(QOMObject):
    """``iothread``: its tunables are kept; blockd's I/O runs in NBD threads."""

    type_name = "iothread"
    class_props = (("thread-pool-min", "int"), ("aio-max-batch", "int"),
                   ("thread-pool-max", "int"), ("poll-max-ns", "int"), ("poll-grow", "int"),
                   ("poll-shrink", "int"))

    def __init__(self) -> None:
        super().__init__()
        self.values = {"thread-pool-min": 0, "aio-max-batch": 0, "thread-pool-max": 64,
                       "poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0}

    def get_prop(self, name: str) -> Any:
        return self.values[name]

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        self.values[name] = visitor("int", name, value)


#: x-<name> legacy property -> (bucket, field), in QEMU's properties[] order.
_LEGACY: Tuple[Tuple[str, Optional[int], str], ...] = tuple(
    ("x-%s-%s%s" % (kind, way, suffix), bucket, field)
    for kind, buckets in (("iops", (OPS_TOTAL, OPS_READ, OPS_WRITE)),
                          ("bps", (BPS_TOTAL, BPS_READ, BPS_WRITE)))
    for way, bucket in zip(("total", "read", "write"), buckets)
    for suffix, field in (("", "avg"), ("-max", "max"), ("-max-length", "burst_length"))
) + (("x-iops-size", None, "op_size"),)


def _throttle_class_props() -> Tuple[Tuple[str, str], ...]:
    """The class properties in qom-list order: the reverse of the GLib hash
    table of throttle_group_obj_class_init()."""
    table = GHashSet()
    for name, _kind, _default in _LEGACY:
        table.insert(name)
    table.insert("limits")
    names = [k for k in table.keys if k is not None]
    names.reverse()
    return tuple((n, "ThrottleLimits" if n == "limits" else "int") for n in names)


class ThrottleGroupObject(QOMObject):
    """``throttle-group`` (block/throttle-groups.c's QOM part).

    :param clock: the group's clock (ns); tests inject a fake one.
    """

    type_name = "throttle-group"
    class_props = _throttle_class_props()

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        super().__init__()
        self.group = ThrottleGroup("", clock)
        self.initialized = False
        #: The tree's group registry, set by ObjectTree (throttle_groups list).
        self.registry: Optional[Dict[str, "ThrottleGroupObject"]] = None

    def get_prop(self, name: str) -> Any:
        cfg = self.group.get_config()
        if name == "limits":
            return cfg.to_limits()
        for pname, bucket, field in _LEGACY:
            if pname == name:
                if bucket is None:
                    return cfg.to_limits()["iops-size"]
                return int(getattr(cfg.buckets[bucket], field))
        raise KeyError(name)

    def set_prop(self, name: str, value: Any, visitor: "Callable[..., Any]") -> None:
        if name == "limits":
            limits = visitor("ThrottleLimits", name, value)
            self.set_limits(limits)
            return
        # throttle_group_set(): the legacy properties only before completion
        if self.initialized:
            raise QMPError("Property cannot be set after initialization")
        value = visitor("int", name, value)
        if value < 0:
            raise QMPError("Property values cannot be negative")
        for pname, bucket, field in _LEGACY:
            if pname != name:
                continue
            cfg = self.group.ts.cfg
            if bucket is None:
                cfg.op_size = value
            elif field == "burst_length":
                if value > UINT_MAX:
                    raise QMPError("%s value must be in therange [0, %d]" % (name, UINT_MAX))
                cfg.buckets[bucket].burst_length = value
            else:
                setattr(cfg.buckets[bucket], field, value)

    def set_limits(self, limits: Dict[str, int]) -> None:
        """throttle_group_set_limits(): merge, validate, apply to every member."""
        with self.group.lock:
            cfg = self.group.ts.get_config()
            cfg.apply_limits(limits)
            self.group.ts.config(cfg, self.group.clock())
            self.group.lock.notify_all()

    def complete(self) -> None:
        """throttle_group_obj_complete()."""
        self.group.name = self.name
        if self.registry is None:
            raise AssertionError("object registry missing")
        if self.name in self.registry:
            raise QMPError("A group with this name already exists")
        cfg = self.group.ts.get_config()
        cfg.check_valid()
        self.group.config(cfg)
        self.registry[self.name] = self
        self.initialized = True

    def can_be_deleted(self) -> bool:
        """throttle_group_can_be_deleted(): no ``throttle`` node uses it."""
        return not self.group.in_use()

    def finalize(self) -> None:
        if self.initialized and self.registry is not None:
            self.registry.pop(self.name, None)


_FACTORIES: Dict[str, Callable[["ObjectTree"], QOMObject]] = {
    "throttle-group": lambda tree: ThrottleGroupObject(tree.clock),
    "secret": lambda tree: SecretObject(),
    "iothread": lambda tree: IOThreadObject(),
    "tls-creds-x509": TLSCredsX509Object,
    "authz-simple": lambda tree: AuthzSimpleObject(),
}


class ObjectTree:
    """The QOM tree of one daemon, and its throttle groups by name.

    :param schema: the QMP schema (values are checked against its types).
    :param clock: the clock new throttle groups use (ns).
    """

    def __init__(self, schema: Any, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.schema = schema
        self.clock = clock
        self.root = Container()
        #: QEMU's throttle_groups list: completed groups by name.
        self.throttle_groups: Dict[str, ThrottleGroupObject] = {}
        self._defs: Optional[Dict[str, Any]] = None

    # -- containers ---------------------------------------------------------

    def container(self, name: str) -> Container:
        """container_get(): ``/name``, created on first use."""
        obj = self.root.child(name)
        if obj is None:
            obj = Container()
            self.root.add_child(name, obj)
        if not isinstance(obj, Container):
            raise AssertionError("not a container: %r" % (obj,))
        return obj

    def add_chardev(self, cid: str, opts: Dict[str, Any], sock: Any,
                    connected: Callable[[], bool]) -> None:
        """A ``--chardev`` appears as ``/chardevs/<id>``."""
        self.container("chardevs").add_child(cid, Chardev(socket_address(opts, sock), connected))

    # -- value checking -----------------------------------------------------

    def visit(self, qapi_type: str, name: str, value: Any) -> Any:
        """Check ``value`` as QEMU's QOMObject input visitor does for a property."""
        if self._defs is None:
            self._defs = {d: self.schema.definition(d) for d in self.schema.definitions()}
        if qapi_type in ("int", "str", "boolean"):
            node: Dict[str, Any] = {"$ref": "#/definitions/int"} if qapi_type == "int" \
                else {"type": "string" if qapi_type == "str" else "boolean"}
        else:
            node = {"$ref": "#/definitions/%s" % qapi_type}
        wrapper = {"type": "object", "properties": {name: node}, "required": [name],
                   "additionalProperties": False}
        try:
            return QapiVisitor(self._defs).visit(wrapper, {name: value})[name]
        except VisitError as exc:
            raise QMPError(str(exc)) from None

    # -- object-add / object-del --------------------------------------------

    def add(self, qom_type: str, oid: str, props: Dict[str, Any]) -> QOMObject:
        """user_creatable_add_type() with the properties of an ObjectOptions.

        Properties are set in the order QEMU's QDict iterates them; a failure
        while completing removes the child again (the tombstone this leaves
        in the hash table affects the listing order, as in QEMU).
        """
        if not id_wellformed(oid):
            raise QMPError("Parameter 'id' expects an identifier")
        factory = _FACTORIES.get(qom_type)
        if factory is None:
            raise QMPError("invalid object type: %s" % qom_type)
        obj = factory(self)
        if isinstance(obj, ThrottleGroupObject):
            obj.registry = self.throttle_groups
        for name in qdict_order(props):
            obj.set(name, props[name], self.visit)
        objects = self.container("objects")
        objects.add_child(oid, obj)
        try:
            obj.complete()
        except BaseException:
            objects.del_child(oid)
            raise
        return obj

    def delete(self, oid: str) -> None:
        """user_creatable_del()."""
        objects = self.container("objects")
        obj = objects.child(oid)
        if obj is None:
            raise QMPError("object '%s' not found" % oid)
        if not obj.can_be_deleted():
            raise QMPError("object '%s' is in use, can not be deleted" % oid)
        objects.del_child(oid)
        obj.finalize()

    # -- lookups for other subsystems ----------------------------------------

    def user_object(self, oid: str) -> Optional[QOMObject]:
        """object_resolve_path_component(object_get_objects_root(), id)."""
        objects = self.root.child("objects")
        return objects.child(oid) if isinstance(objects, Container) else None

    def tls_creds(self, oid: str, endpoint: str) -> TLSCredsX509Object:
        """nbd_get_tls_creds() / qcrypto_tls_creds_check_endpoint().

        :raises QMPError: ``No TLS credentials with id 'x'``, ``Object with id
            'x' is not TLS credentials``, ``Expected TLS credentials for a
            server endpoint``.
        """
        obj = self.user_object(oid)
        if obj is None:
            raise QMPError("No TLS credentials with id '%s'" % oid)
        if not isinstance(obj, TLSCredsX509Object):
            raise QMPError("Object with id '%s' is not TLS credentials" % oid)
        if obj.endpoint != endpoint:
            raise QMPError("Expected TLS credentials for a %s endpoint" % endpoint)
        return obj

    def authorizer(self, oid: str) -> Callable[[str], Optional[str]]:
        """A ``tls-authz`` check resolved per client, as QEMU does
        (qauthz_is_allowed_by_id(): the object may come or go later).

        :return: ``check(identity)``: None if allowed, else why not.
        """
        def check(identity: str) -> Optional[str]:
            obj = self.user_object(oid)
            if obj is None:
                return "Cannot find QAuthZ object ID %s" % oid
            if not isinstance(obj, AuthzSimpleObject):
                return "Object '%s' is not a QAuthZ subclass" % oid
            if not obj.is_allowed(identity):
                return "TLS x509 authz check for %s is denied" % identity
            return None
        return check

    def secret_text(self, oid: str) -> str:
        """qcrypto_secret_lookup_as_utf8(): a ``secret``'s data as text.

        :raises QMPError: no such secret, or its data cannot be read.
        """
        obj = self.user_object(oid)
        if not isinstance(obj, SecretObject):
            raise QMPError("No secret with id '%s'" % oid)
        data, path = obj.values["data"], obj.values["file"]
        if path:
            try:
                with open(path, "rb") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise QMPError("Unable to read %s: %s" % (path, exc.strerror)) from None
        else:
            raw = data.encode("utf-8")
        if obj.values["format"] == "base64":
            import base64
            raw = base64.b64decode(raw)
        return raw.decode("utf-8", "replace")

    # -- paths --------------------------------------------------------------

    def _abs(self, obj: QOMObject, parts: List[str]) -> Optional[QOMObject]:
        """object_resolve_abs_path() (child<> properties only)."""
        for part in parts:
            if not isinstance(obj, Container):
                return None
            nxt = obj.child(part)
            if nxt is None:
                return None
            obj = nxt
        return obj

    def _partial(self, obj: QOMObject, parts: List[str]) -> "Tuple[Optional[QOMObject], bool]":
        """object_resolve_partial_path(): (match, ambiguous)."""
        found = self._abs(obj, parts)
        for _name, child in obj.children():
            sub, ambiguous = self._partial(child, parts)
            if ambiguous:
                return None, True
            if sub is not None:
                if found is not None:
                    return None, True
                found = sub
        return found, False

    def resolve(self, path: str, report_ambiguous: bool = False) -> QOMObject:
        """object_resolve_path(): an absolute or partial path.

        Only qom-list says "ambiguous"; qom-get and qom-set pass no
        ``ambiguous`` pointer and report every miss as DeviceNotFound.
        """
        parts = [p for p in path.split("/") if p]
        if path.startswith("/"):
            obj = self._abs(self.root, parts)
            ambiguous = False
        else:
            obj, ambiguous = self._partial(self.root, parts)
        if obj is None:
            if ambiguous and report_ambiguous:
                raise QMPError("Path '%s' is ambiguous" % path)
            raise DeviceNotFound("Device '%s' not found" % path)
        return obj


def tree(daemon: Any) -> ObjectTree:
    """The daemon's object tree, created on first use.

    It replaces the placeholder ``daemon.objects`` dict and is published on
    the graph as ``graph.throttle_groups`` so that ``throttle`` nodes find
    their group.
    """
    objs = getattr(daemon, "objects", None)
    if not isinstance(objs, ObjectTree):
        objs = ObjectTree(daemon.schema)
        daemon.objects = objs
        daemon.graph.throttle_groups = objs.throttle_groups
    return objs
