# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the backup data path modules share (nbd_copy, backup_verify, backup_restore).

They drive blockd's copy engine (``blockd.copy``) in the module's own
process -- no QMP, no socket option.  This module holds:

* :data:`NBD_ARGUMENT_SPEC`, the options of the ``blockdev.fleecing.nbd``
  doc fragment (TLS, SSH tunnel, connect timeout), and
  :func:`connect_kwargs`, which turns them into the engine's
  ``connect_uri`` keyword arguments for one NBD URI (and fails the task
  clearly on a bad URI, unreadable certificates, or no paramiko);
* :func:`fail_copy`, the one way a :class:`CopyError` ends a task;
* manifest helpers (:func:`read_manifest`, :func:`manifest_summary`,
  :func:`chain_of`) and read-only looks at exports and images
  (:func:`plan_export`, :func:`image_digest`) for check mode and idempotence.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import os
import ssl
import traceback

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy import manifest as mf
from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.errors import (
    CopyError)
from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.plan import (
    make_plan, plan_from_dirty_status)
from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.nbd.client import (
    NBDError, URIError, connect_uri, parse_uri, tls_context)

#: The options of the ``blockdev.fleecing.nbd`` doc fragment.
NBD_ARGUMENT_SPEC = dict(
    tls_certificates=dict(type="path"),
    tls_verify_peer=dict(type="bool", default=True),
    connect_timeout=dict(type="float", default=30.0),
    ssh_identity=dict(type="list", elements="path"),
    ssh_passphrase=dict(type="str", no_log=True),
    ssh_known_hosts=dict(type="list", elements="path"),
    ssh_host_key_checking=dict(type="bool", default=True),
    ssh_allow_agent=dict(type="bool", default=True),
)

__all__ = ["NBD_ARGUMENT_SPEC", "CopyError", "chain_of", "connect_kwargs", "default_manifest",
           "export_identity", "fail_copy", "image_digest", "manifest_summary", "plan_export",
           "read_manifest", "resolve_base", "totals"]

_BASE_ALLOCATION = "base:allocation"
_KINDS = ("data", "zero", "hole", "unchanged")


def fail_copy(module, exc, **extra):
    """End the task with a :class:`CopyError`'s message and kind (``error``)."""
    result = dict(changed=False, error=exc.kind)
    result.update(extra)
    module.fail_json(msg=exc.message, **result)


def connect_kwargs(module, uri, what="source"):
    """``connect_uri`` keyword arguments for URI from the module's NBD options.

    * ``tls_certificates`` (a libnbd/QEMU x509 directory) makes a TLS context
      and requires TLS even for an ``nbd://`` URI; ``tls_verify_peer: false``
      turns certificate checks off (``nbds://`` URIs only, or with
      ``tls_certificates``).
    * ``nbd+ssh://`` URIs get the ``ssh_*`` options; without paramiko the
      task fails with Ansible's ``missing_required_lib`` message.

    :param what: the option holding the URI (for messages).
    """
    params = module.params
    try:
        parsed = parse_uri(uri)
    except URIError as exc:
        module.fail_json(msg="%s: %s" % (what, exc), changed=False, error="usage")
    kwargs = dict(connect_timeout=params["connect_timeout"])
    certs = params["tls_certificates"]
    if certs is not None or (parsed.tls and not params["tls_verify_peer"]):
        if certs is not None and not os.path.isdir(certs):
            module.fail_json(msg="tls_certificates: %s is not a directory" % certs,
                             changed=False, error="usage")
        check = params["tls_verify_peer"] and (parsed.transport == "tcp"
                                               or bool(parsed.tls_hostname))
        try:
            kwargs["tls"] = tls_context(certificates_dir=certs or parsed.tls_certificates,
                                        verify_peer=params["tls_verify_peer"],
                                        check_hostname=check)
        except (ssl.SSLError, OSError) as exc:
            module.fail_json(msg="cannot load the TLS certificates in %s: %s" % (certs, exc),
                             changed=False, error="usage")
    if parsed.transport == "ssh":
        from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.nbd import (
            client_ssh)
        if not client_ssh.have_paramiko():
            module.fail_json(msg=missing_required_lib(
                "paramiko", reason="for nbd+ssh:// URIs (the SSH tunnel)"),
                exception=traceback.format_exc(), changed=False, error="usage")
        for key in ("ssh_identity", "ssh_passphrase", "ssh_known_hosts"):
            if params[key]:
                kwargs[key] = params[key]
        kwargs["ssh_host_key_checking"] = params["ssh_host_key_checking"]
        kwargs["ssh_allow_agent"] = params["ssh_allow_agent"]
    return kwargs


# -- manifests ------------------------------------------------------------------------------

def default_manifest(path):
    """The manifest the engine writes beside a backup."""
    return path + ".manifest.json"


def read_manifest(path):
    """The complete, self-checked manifest at PATH.

    :raise CopyError: ``manifest`` when missing, corrupted or incomplete.
    """
    return mf.load(path)


def totals(extents):
    """Bytes per extent type (``data``, ``zero``, ``hole``, ``unchanged``)."""
    out = dict((k, 0) for k in _KINDS)
    for e in extents:
        out[e["type"]] = out.get(e["type"], 0) + e["length"]
    return out


def manifest_summary(doc):
    """What a manifest says about its backup, for results and diffs."""
    base = doc.get("base") or None
    return dict(format=doc["format"], size=doc["size"], export=doc.get("export"),
                source=doc.get("source"), disk_sha256=doc["disk_sha256"],
                base=base and base.get("path"), created=doc.get("created"),
                extents=len(doc["extents"]), bytes=totals(doc["extents"]))


def resolve_base(path, doc):
    """The base backup DOC (the manifest of PATH) names, as a path (None for a full backup).

    Found as QEMU finds a backing file: the name recorded in the manifest
    (``base.backing_file``), relative to the directory of PATH.
    """
    base = doc.get("base")
    if not base:
        return None
    name = base.get("backing_file") or base.get("path")
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)


def chain_of(path, manifest=None):
    """The backups of a chain, top first: ``[(backup, manifest path, doc), ...]``.

    A base is found as QEMU finds a backing file: the name recorded in the
    manifest (``base.backing_file``), relative to the directory of the image
    that names it.

    :raise CopyError: ``manifest`` for an unusable manifest, ``base`` for a
        base that is missing or whose manifest does not match what its
        successor recorded.
    """
    out = []
    seen = set()
    man = manifest or default_manifest(path)
    while True:
        doc = read_manifest(man)
        out.append((path, man, doc))
        seen.add(os.path.realpath(path))
        base = doc.get("base")
        nxt = resolve_base(path, doc)
        if nxt is None:
            return out
        if os.path.realpath(nxt) in seen:
            raise CopyError("base", "backing chain of %s loops at %s" % (out[0][0], nxt))
        nman = default_manifest(nxt)
        if not os.path.exists(nxt):
            raise CopyError("base", "base backup %s of %s is missing" % (nxt, path))
        try:
            digest = mf.file_digest(nman)
        except OSError:
            raise CopyError("base", "base backup %s of %s has no manifest %s"
                            % (nxt, path, nman)) from None
        if base.get("manifest_sha256") and digest != base["manifest_sha256"]:
            raise CopyError("base", "manifest of base backup %s changed since %s was taken"
                            % (nxt, path))
        path, man = nxt, nman


# -- read-only looks --------------------------------------------------------------------------

def export_identity(uri, **kwargs):
    """``(export name, size, read-only)`` of URI, from the handshake alone.

    :raise CopyError: ``source`` when the export cannot be reached.
    """
    try:
        client = connect_uri(uri, meta_contexts=[], **kwargs)
    except NBDError as exc:
        raise CopyError("source", "connecting to %s failed: %s"
                        % (mf.redact_uri(uri), exc)) from None
    try:
        return client.info.name, client.size, client.info.read_only
    finally:
        try:
            client.close()
        except (NBDError, OSError):
            pass


def plan_export(uri, bitmap=None, **kwargs):
    """What a pull of URI would copy, read from block status (nothing is written).

    :param bitmap: an incremental's dirty bitmap (``qemu:dirty-bitmap:NAME``).
    :return: ``export`` (name), ``size``, ``extents`` and ``bytes`` per type.
    :raise CopyError: ``source`` when the export cannot be reached or read,
        ``usage`` when it does not offer the bitmap.
    """
    contexts = [_BASE_ALLOCATION] + (["qemu:dirty-bitmap:" + bitmap] if bitmap else [])
    redacted = mf.redact_uri(uri)
    try:
        client = connect_uri(uri, meta_contexts=contexts, **kwargs)
    except NBDError as exc:
        raise CopyError("source", "connecting to %s failed: %s" % (redacted, exc)) from None
    try:
        size = client.size
        if client.can_meta_context(_BASE_ALLOCATION):
            status = [tuple(e) for e in client.map(_BASE_ALLOCATION)]
        else:
            status = [(0, size, 0)]
        dirty = None
        if bitmap:
            if not client.can_meta_context(contexts[1]):
                raise CopyError("usage", "the export does not offer meta context %r"
                                % contexts[1])
            dirty = plan_from_dirty_status([tuple(e) for e in client.map(contexts[1])])
        plan = make_plan(size, status, dirty)
        return dict(export=client.info.name, size=size, extents=len(plan),
                    bytes=totals(dict(offset=o, length=n, type=k) for o, n, k in plan))
    except NBDError as exc:
        raise CopyError("source", "block status of %s failed: %s" % (redacted, exc)) from None
    finally:
        try:
            client.close()
        except (NBDError, OSError):
            pass


def image_digest(path, fmt=None):
    """``(format, size, disk_sha256)`` of a local image, in the manifests'
    ``sha256-blocks-1MiB`` scheme (read through blockd's drivers; a qcow2 with
    its backing chain; ranges block status reports zero are not read).

    :raise CopyError: when it cannot be opened.
    """
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.output import (
        LocalImage)
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.restore import (
        _stream)
    img = LocalImage(path, fmt, "image")
    try:
        res = _stream(img, None, lambda o, b: None, lambda o, n: None, path)
        return img.fmt, img.size, res["disk_sha256"]
    finally:
        img.close()
