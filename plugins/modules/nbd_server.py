#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.nbd_server."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: nbd_server
short_description: Start or stop the NBD server of a blockd or qemu-storage-daemon engine
version_added: 0.1.0
description:
  - Makes sure the engine's NBD server runs (QMP C(nbd-server-start)) or does
    not (C(nbd-server-stop)). An engine has at most one NBD server; block exports
    of type V(nbd) (M(blockdev.fleecing.nbd_export)) need it.
  - QEMU 7.2 has no QMP command that reports the NBD server or its settings, on
    either engine. The module therefore tries C(nbd-server-start) and takes
    C(NBD server already running) as "present". It then checks that something
    accepts connections at O(addr); if nothing does, the running server was
    started with another address and the task fails, changing nothing.
  - The address check proves that a socket listens at O(addr), not that it is
    this engine's. Changes of O(max_connections), O(tls_creds) or O(tls_authz) of
    a running server cannot be detected; stop the server (O(state=absent)) and
    start it again to change them.
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
attributes:
  check_mode:
    support: full
    details:
      - The prediction comes from the engine's NBD exports (a server with exports
        runs) and from connecting to O(addr). Without O(addr) and without NBD
        exports, O(state=absent) cannot tell whether a server runs and predicts
        no change.
options:
  state:
    description:
      - V(present) starts the server if none runs.
      - V(absent) stops it; this removes every NBD export of the engine (see O(force)).
    type: str
    choices: [present, absent]
    default: present
  addr:
    description:
      - Where the server listens, as QMP's C(SocketAddress).
      - Required with O(state=present). With O(state=absent) it is only used to
        tell, in check mode, whether a server runs.
    type: dict
    suboptions:
      type:
        description: V(unix) for a UNIX socket, V(inet) for TCP.
        type: str
        choices: [unix, inet]
        default: unix
      path:
        description:
          - The UNIX socket path (O(addr.type=unix)). The engine replaces a file
            already at that path.
        type: path
      host:
        description:
          - The address or host name to listen on (O(addr.type=inet)).
          - Default V(127.0.0.1), loopback only. Name an outside address (or
            V(0.0.0.0)) on purpose, and use O(tls_creds) there - NBD itself has no
            authentication.
        type: str
      port:
        description: The TCP port (O(addr.type=inet)), 1 to 65535.
        type: int
  max_connections:
    description:
      - Most clients at a time (C(max-connections)); V(0) means no limit. The
        engine's default is V(100). Used when the server is started.
    type: int
  tls_creds:
    description:
      - Id of a C(tls-creds-x509) object of the engine (server endpoint); clients
        must then use TLS (C(nbds://) URIs). Used when the server is started.
    type: str
  tls_authz:
    description:
      - Id of an authorization object that checks the client certificates'
        distinguished names. Needs O(tls_creds).
    type: str
  force:
    description:
      - With O(state=absent), stop the server even though it has NBD exports;
        they are removed and their clients disconnected. Without it, the task
        fails, naming the exports, and changes nothing.
    type: bool
    default: false
seealso:
  - module: blockdev.fleecing.nbd_export
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Serve NBD on a UNIX socket
  blockdev.fleecing.nbd_server:
    socket: /run/blockd/qmp.sock
    addr:
      type: unix
      path: /run/blockd/nbd.sock
  register: nbd

- name: Export a node on it, and get its URI
  blockdev.fleecing.nbd_export:
    id: disk0-export
    node_name: disk0
    server: "{{ nbd.addr }}"

- name: Serve NBD over TCP with TLS, at most 4 clients
  blockdev.fleecing.nbd_server:
    addr:
      type: inet
      host: 0.0.0.0
      port: 10809
    tls_creds: tls0
    max_connections: 4

- name: Stop the server and whatever is still exported
  blockdev.fleecing.nbd_server:
    state: absent
    force: true
"""

RETURN = r"""
running:
  description: Whether the NBD server runs after the task (predicted in check mode).
  returned: always
  type: bool
  sample: true
started:
  description: Whether this task started the server (would start it, in check mode).
  returned: always
  type: bool
addr:
  description:
    - The requested address as a flat C(SocketAddress), to pass on as
      O(blockdev.fleecing.nbd_export#module:server).
  returned: when O(addr) is given
  type: dict
  sample: {"type": "unix", "path": "/run/blockd/nbd.sock"}
uri:
  description:
    - The NBD URI of the server's default export (empty name); an export's URI
      puts its name after the V(/) (M(blockdev.fleecing.nbd_export) returns it).
  returned: when O(addr) is given
  type: str
  sample: nbd+unix:///?socket=/run/blockd/nbd.sock
removed_exports:
  description:
    - Ids of the NBD exports that stopping the server removed (would remove, in check mode).
  returned: always
  type: list
  elements: str
"""

import socket

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    nbd_exports, nbd_uri, try_execute, wait_exports_gone)

ALREADY_RUNNING = "NBD server already running"
NOT_RUNNING = "NBD server not running"


def flat_addr(addr):
    """The flat SocketAddress of the ADDR option (only the keys of its type)."""
    if addr["type"] == "unix":
        return dict(type="unix", path=addr["path"])
    return dict(type="inet", host=addr["host"], port=addr["port"])


def legacy_addr(addr):
    """nbd-server-start's SocketAddressLegacy ({type, data}); QMP wants the port as a string."""
    flat = flat_addr(addr)
    data = dict((k, v) for k, v in flat.items() if k != "type")
    if "port" in data:
        data["port"] = str(data["port"])
    return dict(type=flat["type"], data=data)


def listening(addr, timeout):
    """True when something accepts connections at ADDR (flat SocketAddress)."""
    if addr["type"] == "unix":
        family, target = socket.AF_UNIX, addr["path"]
    else:
        try:
            infos = socket.getaddrinfo(addr["host"], addr["port"], 0, socket.SOCK_STREAM)
        except socket.gaierror:
            return False
        family, target = infos[0][0], infos[0][4]
        if addr["host"] in ("0.0.0.0", "::", ""):
            family, target = (socket.AF_INET6 if addr["host"] == "::" else socket.AF_INET,
                              ("::1" if addr["host"] == "::" else "127.0.0.1", addr["port"]))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(min(timeout, 5.0))
    try:
        sock.connect(target)
    except (OSError, socket.error):
        return False
    finally:
        sock.close()
    return True


def check_addr(mod, addr):
    """Fail on an address whose options do not fit its type."""
    if addr["type"] == "unix":
        if not addr.get("path"):
            mod.fail("addr.type is unix but addr.path is missing")
        if addr.get("host") or addr.get("port") is not None:
            mod.fail("addr.host and addr.port conflict with addr.type=unix")
    else:
        if not addr.get("host"):
            addr["host"] = "127.0.0.1"      # loopback unless told otherwise
        if addr.get("port") is None:
            mod.fail("addr.type is inet but addr.port is missing")
        if addr.get("path"):
            mod.fail("addr.path conflicts with addr.type=inet")
        if not 1 <= addr["port"] <= 65535:
            mod.fail("addr.port must be between 1 and 65535, not %d" % addr["port"])


def running_elsewhere(mod, addr):
    """Fail: a server runs but nothing listens at ADDR."""
    mod.fail("an NBD server is already running, but nothing listens at %s: it was started "
             "with another address; stop it first (state=absent), nothing was changed"
             % (addr.get("path") or "%s:%s" % (addr["host"], addr["port"])),
             running=True, started=False)


def present(mod, addr):
    """state=present."""
    p = mod.params
    mod.result.update(addr=addr, uri=nbd_uri(addr, "", tls=bool(p["tls_creds"])),
                      removed_exports=[], started=False, running=True)
    started_view = dict(running=True, addr=addr)
    for key in ("max_connections", "tls_creds", "tls_authz"):
        if p[key] is not None:
            started_view[key] = p[key]
    if mod.check_mode:
        exports = nbd_exports(mod)
        up = listening(addr, p["timeout"])
        if exports and not up:
            running_elsewhere(mod, addr)
        if exports or up:
            mod.exit(dict(running=True), dict(running=True))
        mod.result.update(changed=True, started=True)
        mod.exit(None, started_view)
    args = dict(addr=legacy_addr(addr))
    for key in ("max_connections", "tls_creds", "tls_authz"):
        if p[key] is not None:
            args[key.replace("_", "-")] = p[key]
    err = try_execute(mod, "nbd-server-start", args)[1]
    if err is None:
        mod.result.update(changed=True, started=True)
        mod.exit(None, started_view)
    if err.desc != ALREADY_RUNNING:
        mod.fail("nbd-server-start failed: %s" % err.desc, error_class=err.klass,
                 running=False, started=False)
    if not listening(addr, p["timeout"]):
        running_elsewhere(mod, addr)
    mod.exit(dict(running=True), dict(running=True))


def absent(mod, addr):
    """state=absent."""
    p = mod.params
    exports = nbd_exports(mod)
    mod.result.update(removed_exports=[], started=False, running=False)
    if addr is not None:
        mod.result.update(addr=addr, uri=nbd_uri(addr, "", tls=bool(p["tls_creds"])))
    if exports and not p["force"]:
        mod.fail("the NBD server has export(s) %s; stopping it would remove them: remove them "
                 "first or set force=true; nothing was changed" % ", ".join(exports),
                 running=True)
    before = dict(running=True, nbd_exports=exports)
    if mod.check_mode:
        if exports or (addr is not None and listening(addr, p["timeout"])):
            mod.result.update(changed=True, removed_exports=exports)
            mod.exit(before, None)
        mod.exit(None, None)
    err = try_execute(mod, "nbd-server-stop")[1]
    if err is not None:
        if err.desc == NOT_RUNNING:
            mod.exit(None, None)
        mod.fail("nbd-server-stop failed: %s" % err.desc, error_class=err.klass, running=True)
    mod.result.update(changed=True, removed_exports=exports)
    wait_exports_gone(mod, exports)
    mod.exit(before, None)


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        state=dict(type="str", choices=["present", "absent"], default="present"),
        addr=dict(type="dict", options=dict(
            type=dict(type="str", choices=["unix", "inet"], default="unix"),
            path=dict(type="path"),
            host=dict(type="str"),
            port=dict(type="int"))),
        max_connections=dict(type="int"),
        tls_creds=dict(type="str"),
        tls_authz=dict(type="str"),
        force=dict(type="bool", default=False)),
        required_if=[("state", "present", ("addr",))],
        required_by={"tls_authz": ("tls_creds",)})
    addr = mod.params["addr"]
    if addr is not None:
        check_addr(mod, addr)
        addr = flat_addr(addr)
    if mod.params["max_connections"] is not None and mod.params["max_connections"] < 0:
        mod.fail("max_connections must be 0 (no limit) or more, not %d"
                 % mod.params["max_connections"])
    if mod.params["state"] == "present":
        present(mod, addr)
    absent(mod, addr)


if __name__ == "__main__":
    main()
