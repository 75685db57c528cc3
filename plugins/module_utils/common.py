# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every QMP module of the collection shares: options, connection, errors, diff.

A module builds a :class:`BlockdModule` with its own argument spec (the
connection options of the ``blockdev.fleecing.qmp`` doc fragment are added),
reads the engine with :meth:`BlockdModule.execute` / the ``query_*`` helpers,
decides, acts only ``if not module.check_mode``, and ends with
:meth:`BlockdModule.exit` giving the state before and after (the diff).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import copy

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import (
    QMPClient, QMPCommandError, QMPError)

#: The options of the ``blockdev.fleecing.qmp`` doc fragment.
QMP_ARGUMENT_SPEC = dict(
    socket=dict(type="path", default="/run/blockd/qmp.sock"),
    timeout=dict(type="float", default=30.0),
)


class BlockdModule:
    """An :class:`AnsibleModule` with a lazily opened QMP session.

    :param argument_spec: the module's own options.
    :param kwargs: further :class:`AnsibleModule` arguments (``mutually_exclusive``...).
    """

    def __init__(self, argument_spec, **kwargs):
        spec = dict(QMP_ARGUMENT_SPEC)
        spec.update(argument_spec)
        kwargs.setdefault("supports_check_mode", True)
        self.module = AnsibleModule(argument_spec=spec, **kwargs)
        self.params = self.module.params
        self.check_mode = self.module.check_mode
        self.result = dict(changed=False)
        self._qmp = None

    # -- engine access ------------------------------------------------------------------------
    @property
    def qmp(self):
        """The connected :class:`QMPClient` (a clear failure if the engine cannot be reached)."""
        if self._qmp is None:
            client = QMPClient(self.params["socket"], self.params["timeout"])
            try:
                client.connect()
            except QMPError as exc:
                self.fail(str(exc))
            self._qmp = client
        return self._qmp

    def execute(self, command, arguments=None, ignore=()):
        """Run a QMP command; fail the task with the engine's message on an error.

        :param ignore: error classes to return as ``None`` instead of failing.
        """
        try:
            return self.qmp.execute(command, arguments)
        except QMPCommandError as exc:
            if exc.klass in ignore:
                return None
            self.fail("%s failed: %s" % (command, exc.desc), error_class=exc.klass,
                      qmp_command=command, qmp_arguments=arguments or {})
        except QMPError as exc:
            self.fail(str(exc), qmp_command=command)
        return None

    def query_nodes(self):
        """Named block nodes by node name (``query-named-block-nodes`` with ``flat``)."""
        nodes = self.execute("query-named-block-nodes", {"flat": True}) or []
        return dict((n["node-name"], n) for n in nodes)

    def query_exports(self):
        """Block exports by id (``query-block-exports``)."""
        return dict((e["id"], e) for e in self.execute("query-block-exports") or [])

    def query_jobs(self):
        """Block jobs by id (``query-block-jobs``; the ``device`` field is the job id)."""
        return dict((j["device"], j) for j in self.execute("query-block-jobs") or [])

    # -- ending -------------------------------------------------------------------------------
    def fail(self, msg, **extra):
        """Fail the task (closing the session first)."""
        self.close()
        result = dict(self.result)
        result.update(extra)
        result.pop("failed", None)
        self.module.fail_json(msg=msg, **result)

    def exit(self, before=None, after=None, **extra):
        """End the task; with ``--diff`` the result carries ``diff: {before, after}``."""
        self.close()
        self.result.update(extra)
        if self.module._diff:  # pylint: disable=protected-access
            self.result["diff"] = make_diff(before, after)
        self.module.exit_json(**self.result)

    def close(self):
        """Close the QMP session, if one is open."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


def make_diff(before, after):
    """Ansible's diff dict; ``None`` (absent) becomes ``{}`` so the diff reads "added"/"removed"."""
    return dict(before=copy.deepcopy(before) if before is not None else {},
                after=copy.deepcopy(after) if after is not None else {})


def is_subset(wanted, actual):
    """True when every key of WANTED (recursively for dicts) has the same value in ACTUAL."""
    if isinstance(wanted, dict):
        if not isinstance(actual, dict):
            return False
        return all(k in actual and is_subset(v, actual[k]) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(actual, list) and len(wanted) == len(actual)
                and all(is_subset(w, a) for w, a in zip(wanted, actual)))
    return wanted == actual


# -- added for node / nbd_server / nbd_export (H5) ----------------------------------------------
def try_execute(mod, command, arguments=None):
    """Run a QMP command through MOD (a :class:`BlockdModule`) without failing on its refusal.

    Returns ``(return value, None)``, or ``(None, QMPCommandError)`` when the engine
    answered with an error (``.klass``, ``.desc``), so that a module can tell errors
    apart by message (``NBD server already running``) or add a hint to them.  An
    unreachable engine or a timeout still fails the task.
    """
    try:
        return mod.qmp.execute(command, arguments), None
    except QMPCommandError as exc:
        return None, exc
    except QMPError as exc:
        mod.fail(str(exc), qmp_command=command)
    return None, None


def nbd_uri(addr, export_name="", tls=False):
    """The NBD URI of EXPORT_NAME on a server listening at ADDR, or None.

    ADDR is a flat SocketAddress dict: ``{type: unix, path: P}`` gives
    ``nbd+unix:///NAME?socket=P``, ``{type: inet, host: H, port: N}`` gives
    ``nbd://H:N/NAME`` (``nbds...`` with TLS); other address types give None.
    """
    from urllib.parse import quote  # pylint: disable=import-outside-toplevel
    if not addr:
        return None
    scheme = "nbds" if tls else "nbd"
    name = quote(export_name or "", safe="")
    if addr.get("type", "unix") == "unix" and addr.get("path"):
        return "%s+unix:///%s?socket=%s" % (scheme, name, quote(addr["path"], safe="/"))
    if addr.get("type") == "inet" and addr.get("host") and addr.get("port") is not None:
        host = addr["host"]
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        return "%s://%s:%s/%s" % (scheme, host, addr["port"], name)
    return None


def nbd_exports(mod):
    """Ids of the engine's block exports of type ``nbd`` (sorted)."""
    return sorted(i for i, e in mod.query_exports().items() if e.get("type") == "nbd")


def wait_exports_gone(mod, ids):
    """Wait until no export of IDS is listed any more (``BLOCK_EXPORT_DELETED``).

    Deleting an export is asynchronous in QEMU: ``query-block-exports`` shows it
    with ``shutting-down: true`` until the event.  Fails the task when an export
    is still there after the module's ``timeout``.
    """
    # pylint: disable-next=import-outside-toplevel
    from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import QMPTimeout
    import time  # pylint: disable=import-outside-toplevel
    deadline = time.time() + mod.params["timeout"]
    while True:
        remaining = set(ids) & set(mod.query_exports())
        if not remaining:
            return
        left = deadline - time.time()
        if left <= 0:
            mod.fail("block export(s) %s still shutting down after %.0f s"
                     % (", ".join(sorted(remaining)), mod.params["timeout"]))
        try:
            mod.qmp.wait_event(lambda ev: (ev.get("event") == "BLOCK_EXPORT_DELETED"
                                           and ev.get("data", {}).get("id") in remaining),
                               timeout=min(left, 1.0))
        except QMPTimeout:
            pass
