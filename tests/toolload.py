"""Import a script under tools/ as a module, for the tests of tools; tools/ goes on sys.path as for a script."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

# a script's own folder leads sys.path when it runs (python tools/x.py), so the tools import their shared modules
# (analysis, run_grid) as siblings; the tests import them, and the tools, the same way
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py once (registered in sys.modules, as dataclasses need)."""
    key = f"tool_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, TOOLS / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]
