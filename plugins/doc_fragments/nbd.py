# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options every module that opens an NBD connection itself shares (TLS, SSH tunnel)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name


class ModuleDocFragment:  # pylint: disable=too-few-public-methods
    """C(extends_documentation_fragment: blockdev.fleecing.nbd)."""

    DOCUMENTATION = r"""
options:
  tls_certificates:
    description:
      - Directory of x509 files for NBD over TLS, in the layout of libnbd's
        C(tls-certificates) and QEMU's C(tls-creds-x509) C(dir) -
        C(ca-cert.pem) (the CA that signed the server certificate) and,
        for servers that verify clients, C(client-cert.pem) and C(client-key.pem).
      - Setting it requires TLS, even with an C(nbd://) URI. Without it, an
        C(nbds://) URI uses its C(tls-certificates=) query parameter, else the
        system CA store.
      - Only x509 certificates; TLS-PSK is not supported.
    type: path
  tls_verify_peer:
    description:
      - Verify the server certificate (and, for C(nbds://HOST), that it names HOST).
      - V(false) accepts any certificate; the connection is still encrypted.
    type: bool
    default: true
  connect_timeout:
    description:
      - Seconds to wait for the connection, the NBD handshake and (C(nbd+ssh://))
        the SSH connection and authentication.
    type: float
    default: 30
  ssh_identity:
    description:
      - Private key file(s) for C(nbd+ssh://) URIs (as C(ssh -i)).
      - Without it, ssh-agent's keys (see O(ssh_allow_agent)) and the default
        C(~/.ssh/id_*) keys of the user the module runs as are tried.
      - SSH authentication is by key only.
    type: list
    elements: path
  ssh_passphrase:
    description:
      - Passphrase of an encrypted O(ssh_identity) key.
    type: str
  ssh_known_hosts:
    description:
      - known_hosts file(s) holding the SSH server's host key, for C(nbd+ssh://) URIs.
      - Default C(~/.ssh/known_hosts) and C(/etc/ssh/ssh_known_hosts).
      - An unknown or changed host key fails the task, naming the key's SHA256 fingerprint.
    type: list
    elements: path
  ssh_host_key_checking:
    description:
      - V(false) accepts any SSH host key (an explicit opt-out, as
        C(StrictHostKeyChecking=no); not recommended).
    type: bool
    default: true
  ssh_allow_agent:
    description:
      - Also offer the keys of the ssh-agent at C(SSH_AUTH_SOCK).
    type: bool
    default: true
notes:
  - NBD URIs are those of libnbd's C(nbd_connect_uri) -
    C(nbd+unix:///EXPORT?socket=PATH), C(nbd://HOST[:PORT]/EXPORT),
    C(nbds://HOST[:PORT]/EXPORT) (TLS), and
    C(nbd+ssh://[USER@]HOST[:SSHPORT]/EXPORT?socket=PATH) or C(...?nbd-port=N)
    (an SSH tunnel to the NBD server's socket or port on HOST, opened by the module
    with paramiko). Secrets never reach the manifest or the result (the URI is recorded
    without user info or key parameters).
requirements:
  - python3 >= 3.9 on the host the module runs on (the standard library is enough).
  - paramiko, only for C(nbd+ssh://) URIs (Debian package C(python3-paramiko)).
"""
