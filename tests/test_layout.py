"""The package layout: every sub-package imports on its own, and the one-screen API resolves."""

import subprocess
import sys

import pytest

import wsipipe

SUBPACKAGES = ["slides", "tiles", "models", "outputs", "learn", "run"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_imports_in_a_fresh_interpreter(name):
    """A fresh interpreter, so an import that only works because another module ran first fails here."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module('wsipipe.{name}')\n"
        "mods = [m.name for m in pkgutil.iter_modules(pkg.__path__)]\n"
        f"[importlib.import_module('wsipipe.{name}.' + m) for m in mods]\n"
        "print(len(mods))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) >= 2, f"wsipipe.{name} holds {res.stdout.strip()} modules"


def test_public_api_resolves_to_the_stage_functions():
    for name in ["load_config", "open_slide", "tile_slide", "load_model", "infer_store", "stitch_store", "run_slide"]:
        fn = getattr(wsipipe, name)
        assert callable(fn) and fn.__name__ == name
        assert name in dir(wsipipe) and name in wsipipe.__all__
    with pytest.raises(AttributeError, match="no attribute 'tile'"):
        wsipipe.tile  # noqa: B018
