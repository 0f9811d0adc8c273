"""A plugin whose import fails when MNGR_BROKEN_PLUGIN is set (to test failure isolation)."""
import os

if os.environ.get("MNGR_BROKEN_PLUGIN"):
    raise ImportError("this plugin is broken on purpose")
