"""The package layout: every module of every sub-package imports in a fresh interpreter, and the
one-screen API resolves to the stage functions."""

import json
import subprocess
import sys

import pytest

import wsipipe

SUBPACKAGES = ["slides", "tiles", "models", "outputs", "learn", "run", "cli"]


def test_every_module_imports_in_a_fresh_interpreter():
    """Sub-packages in data-flow order, each module by name: an import that only worked because
    a later package had been imported first fails here."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "count = {}\n"
        "for name in sys.argv[1:]:\n"
        "    pkg = importlib.import_module('wsipipe.' + name)\n"
        "    mods = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != '__main__']\n"
        "    for m in mods:\n"
        "        importlib.import_module(f'wsipipe.{name}.{m}')\n"
        "    count[name] = len(mods)\n"
        "print(json.dumps(count))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, *SUBPACKAGES], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    count = json.loads(res.stdout)
    assert set(count) == set(SUBPACKAGES) and min(count.values()) >= 2, count


def test_public_api_resolves_to_the_stage_functions():
    for name in ["load_config", "open_slide", "tile_slide", "load_model", "infer_store", "stitch_store", "run_slide"]:
        fn = getattr(wsipipe, name)
        assert callable(fn) and fn.__name__ == name
        assert name in dir(wsipipe) and name in wsipipe.__all__
    with pytest.raises(AttributeError, match="no attribute 'tile'"):
        wsipipe.tile  # noqa: B018
