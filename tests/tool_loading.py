"""Load a script under tools/ or benchmarks/ as a module (neither folder is a package: the scripts are run by path)."""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(folder, name):
    """``REPO/folder/name.py`` as module ``name``, registered in sys.modules (dataclasses and pickling look there)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_tool(name):
    return load_script("tools", name)
