# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``python3 -m blockd``: run the daemon."""

import sys

from .cli import main

sys.exit(main())
