# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``python3 -m blockd``: run the daemon."""

import sys

from .cli import main
from .qmp.schema import MissingDependency, require_jsonschema


def run() -> int:
    """Check blockd's dependencies, then run the daemon; the exit status."""
    try:
        require_jsonschema()
    except MissingDependency as exc:
        sys.stderr.write("blockd: %s\n" % exc)
        return 1
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
