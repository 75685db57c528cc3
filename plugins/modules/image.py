#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.image."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: image
short_description: Create or remove raw and qcow2 disk image files
version_added: 0.1.0
description:
  - Creates a sparse raw image, or a qcow2 image (optionally on a backing file), with
    blockd's own image code - the code behind its C(blockdev-create) - so the host needs
    no C(qemu-img). The qcow2 images are laid out as C(qemu-img create) lays them out.
  - B(Idempotence.) An existing O(path) is compared with what is asked - format, virtual
    size (when O(size) is set), backing file (compared by the file it resolves to) and
    backing format, cluster size (when O(cluster_size) is set). The same image changes
    nothing. A different one is never destroyed silently - the task fails, showing the
    differences, unless O(recreate=true), which replaces it with a new empty image.
  - A new image is written under a temporary name in the same directory and renamed into
    place only when complete.
  - O(state=absent) removes the file (only a regular file; the images it backs are not
    looked for).
extends_documentation_fragment:
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    description: Reads the existing image's header and predicts; writes nothing.
  diff_mode:
    support: full
    description: The image's format, virtual size, backing file and cluster size before and after.
options:
  path:
    description:
      - The image file.
    type: path
    required: true
  state:
    description:
      - V(present) creates the image when it does not exist; V(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  format:
    description:
      - The image format.
    type: str
    choices: [raw, qcow2]
    default: qcow2
  size:
    description:
      - Virtual size, in bytes or with a unit as C(10G), C(512M), C(64K) (powers of 1024).
      - Needed to create an image, except a qcow2 image with O(backing_file), which then
        gets the backing file's size. When not set, an existing image's size is not compared.
      - A qcow2 size must be a multiple of 512 bytes.
    type: raw
  backing_file:
    description:
      - qcow2 only. The backing file recorded in the image, as given (a relative name
        is relative to the image's directory, as QEMU reads it). It must exist.
    type: str
  backing_format:
    description:
      - qcow2 only. The backing file's format; default the format the backing file has.
    type: str
    choices: [raw, qcow2]
  cluster_size:
    description:
      - qcow2 only. The cluster size, a power of two from C(512) to C(2M)
        (for example C(64K)); 64 KiB when not set. When not set, an existing image's
        cluster size is not compared.
    type: raw
  recreate:
    description:
      - Replace an existing image that differs from what is asked with a new, empty
        one. Its data is lost.
    type: bool
    default: false
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: A 10 GiB qcow2 disk
  blockdev.fleecing.image:
    path: /var/lib/blockd/vda.qcow2
    size: 10G

- name: A sparse raw disk, readable by group disk
  blockdev.fleecing.image:
    path: /var/lib/blockd/vdb.raw
    format: raw
    size: 2G
    group: disk
    mode: "0660"

- name: An overlay on a base image (same size as the base), with 1 MiB clusters
  blockdev.fleecing.image:
    path: /var/lib/blockd/vda-overlay.qcow2
    backing_file: vda.qcow2
    cluster_size: 1M

- name: Remove a scratch image
  blockdev.fleecing.image:
    path: /var/lib/blockd/scratch.qcow2
    state: absent
"""

RETURN = r"""
path:
  description: The image file.
  returned: always
  type: str
image:
  description:
    - The image after the task, C({}) when absent - C(format), C(virtual_size) (bytes),
      C(backing_file), C(backing_format) and C(cluster_size) (C(null) for what does not apply).
    - In check mode, what the task would leave.
  returned: always
  type: dict
  sample: {"format": "qcow2", "virtual_size": 10737418240, "backing_file": null,
           "backing_format": null, "cluster_size": 65536}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.formatters import human_to_bytes

#: The largest qcow2 cluster (also how much of a file is read to parse its header).
_MAX_CLUSTER = 2 << 20
_QCOW2_MAGIC = b"QFI\xfb"


def _bytes(module, name):
    """Option NAME as bytes (``10G``, ``512M``, ``65536``...); None when not set."""
    value = module.params[name]
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError("not a size")
        if isinstance(value, int):
            out = value
        else:
            text = str(value).strip()
            out = int(text) if text.isdigit() else human_to_bytes(text)
    except (TypeError, ValueError) as exc:
        module.fail_json(msg="%s: %r is not a size (bytes, or a number with a unit as 10G): %s"
                         % (name, value, exc))
    if out < 0:
        module.fail_json(msg="%s: %r is negative" % (name, value))
    return out


def inspect(path):
    """What the image file at PATH is: format, virtual size, backing file, cluster size.

    A qcow2 header blockd cannot parse gives ``error`` (the parser's message).
    """
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.drivers.qcow2 \
        import header as hdr
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.errors import (
        QMPError)
    with open(path, "rb") as f:
        head = f.read(_MAX_CLUSTER)
    if head[:4] != _QCOW2_MAGIC:
        return dict(format="raw", virtual_size=os.path.getsize(path), backing_file=None,
                    backing_format=None, cluster_size=None)
    try:
        h = hdr.Header.parse(head)
    except QMPError as exc:
        return dict(format="qcow2", error=str(exc))
    return dict(format="qcow2", virtual_size=h.size, backing_file=h.backing_file,
                backing_format=h.backing_format, cluster_size=h.cluster_size)


def _resolve(path, backing):
    """Where QEMU finds backing file BACKING of image PATH."""
    return backing if os.path.isabs(backing) else \
        os.path.join(os.path.dirname(os.path.abspath(path)), backing)


def _wanted(module):
    """The image the task asks for (sizes in bytes); fails on options that do not fit."""
    p = module.params
    fmt, path = p["format"], p["path"]
    size, cluster = _bytes(module, "size"), _bytes(module, "cluster_size")
    want = dict(format=fmt, virtual_size=size, backing_file=p["backing_file"],
                backing_format=p["backing_format"], cluster_size=cluster)
    if fmt == "raw":
        bad = [k for k in ("backing_file", "backing_format", "cluster_size") if p[k] is not None]
        if bad:
            module.fail_json(msg="%s: only for qcow2 images, not raw" % ", ".join(bad))
        return want
    if p["backing_format"] and not p["backing_file"]:
        module.fail_json(msg="backing_format needs backing_file")
    if p["backing_file"]:
        if p["backing_file"] == "":
            module.fail_json(msg="backing_file is empty")
        real = _resolve(path, p["backing_file"])
        if os.path.realpath(real) == os.path.realpath(path):
            module.fail_json(msg="backing_file %s is the image itself" % p["backing_file"])
        if not os.path.isfile(real):
            module.fail_json(msg="backing_file %s (%s) does not exist" % (p["backing_file"], real))
        base = inspect(real)
        if "error" in base:
            module.fail_json(msg="backing_file %s: %s" % (real, base["error"]))
        if want["backing_format"] is None:
            want["backing_format"] = base["format"]
        want["base_size"] = base["virtual_size"]
    if size is not None and size % 512:
        module.fail_json(msg="size: a qcow2 image size must be a multiple of 512 bytes, not %d"
                         % size)
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.drivers.qcow2 \
        .create import check_qcow2_options
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.errors import (
        QMPError)
    try:
        check_qcow2_options(size or 0, cluster or 65536, p["backing_file"],
                            want["backing_format"])
    except QMPError as exc:
        module.fail_json(msg="cannot create %s: %s" % (path, exc))
    return want


def _differences(path, have, want, given_format):
    """How the existing image HAVE differs from WANT (a list of phrases)."""
    if "error" in have:
        return ["an unreadable qcow2 image (%s)" % have["error"]]
    out = []
    if have["format"] != want["format"]:
        return ["format %s, not %s" % (have["format"], want["format"])]
    if want["virtual_size"] is not None and have["virtual_size"] != want["virtual_size"]:
        out.append("virtual size %d, not %d" % (have["virtual_size"], want["virtual_size"]))
    if want["format"] == "qcow2":
        hb, wb = have["backing_file"], want["backing_file"]
        if (hb is None) != (wb is None) or (hb is not None and os.path.realpath(
                _resolve(path, hb)) != os.path.realpath(_resolve(path, wb))):
            out.append("backing file %s, not %s" % (hb, wb))
        elif wb is not None and have["backing_format"] != want["backing_format"] and \
                (given_format or have["backing_format"] is not None):
            out.append("backing format %s, not %s"
                       % (have["backing_format"], want["backing_format"]))
        if want["cluster_size"] is not None and have["cluster_size"] != want["cluster_size"]:
            out.append("cluster size %d, not %d" % (have["cluster_size"], want["cluster_size"]))
    return out


def _create(module, path, want, replace):
    """Write the image under a temporary name, then move it to PATH."""
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.drivers.qcow2 \
        .create import create_qcow2, create_raw
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.errors import (
        QMPError)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        if want["format"] == "raw":
            create_raw(tmp, want["virtual_size"])
        else:
            create_qcow2(tmp, want["virtual_size"], cluster_size=want["cluster_size"] or 65536,
                         backing_file=want["backing_file"],
                         backing_fmt=want["backing_format"] if want["backing_file"] else None)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails rather than replace a file created meanwhile
            os.unlink(tmp)
    except FileExistsError:
        _unlink(tmp)
        module.fail_json(msg="%s appeared while the image was created: left alone" % path)
    except (QMPError, OSError) as exc:
        _unlink(tmp)
        module.fail_json(msg="cannot create %s: %s" % (path, exc))


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _public(info):
    """An image description for results and diffs."""
    return dict((k, info.get(k)) for k in ("format", "virtual_size", "backing_file",
                                           "backing_format", "cluster_size"))


def main():
    """Entry point."""
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            format=dict(type="str", choices=["raw", "qcow2"], default="qcow2"),
            size=dict(type="raw"),
            backing_file=dict(type="str"),
            backing_format=dict(type="str", choices=["raw", "qcow2"]),
            cluster_size=dict(type="raw"),
            recreate=dict(type="bool", default=False),
        ),
        supports_check_mode=True, add_file_common_args=True)
    p = module.params
    path = p["path"]
    exists = os.path.lexists(path)
    if exists and not os.path.isfile(path):
        module.fail_json(msg="%s exists and is not a regular file" % path, path=path)
    have = inspect(path) if exists else None
    before = _public(have) if have and "error" not in have else (
        dict(format=have["format"], error=have["error"]) if have else {})
    diff = dict(before=before)

    if p["state"] == "absent":
        if exists and not module.check_mode:
            try:
                os.unlink(path)
            except OSError as exc:
                module.fail_json(msg="cannot remove %s: %s" % (path, exc.strerror or exc))
        diff["after"] = {}
        _exit(module, exists, path, {}, diff)

    want = _wanted(module)
    if have is not None:
        diffs = _differences(path, have, want, p["backing_format"] is not None)
        if not diffs:
            return _exit(module, False, path, _public(have), dict(diff, after=before))
        if not p["recreate"]:
            module.fail_json(msg="%s exists and differs (%s): refusing to replace it; "
                             "recreate=true replaces it with a new empty image"
                             % (path, "; ".join(diffs)), diff=dict(diff, after=_public(want)))
    if want["virtual_size"] is None:
        if "base_size" not in want:
            module.fail_json(msg="size is required to create %s" % path)
        want["virtual_size"] = want["base_size"]
    if want["format"] == "qcow2" and want["cluster_size"] is None:
        want["cluster_size"] = 65536
    after = _public(want)
    if not module.check_mode:
        _create(module, path, want, replace=have is not None)
        after = _public(inspect(path))
    return _exit(module, True, path, after, dict(diff, after=after))


def _exit(module, changed, path, image, diff):
    """Apply mode/owner/group (when the file exists) and end the task."""
    if os.path.exists(path) and module.params["state"] == "present":
        file_args = module.load_file_common_arguments(module.params)
        changed = module.set_fs_attributes_if_different(file_args, changed)
    result = dict(changed=changed, path=path, image=image)
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
