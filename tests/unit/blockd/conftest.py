"""Unit tests of the engine import it from the checkout, as `python3 -m blockd` does."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "plugins", "module_utils"))
