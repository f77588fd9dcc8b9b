"""Every command as a new user first tries it: nothing given, an option misspelt, a path that is not there.

The commands are enumerated from the click group the ``wsipipe`` app builds, so a command added
later is covered without touching this file. Each case runs in-process through click's runner
(the error policy lives in the app's group, so it meets what a user meets); a few run the real
``python -m wsipipe.cli`` process to cover the entry point, ``--version`` and start-up weight.

A user-facing "unexpected" is a bug: no case here may print one, or a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from wsipipe.cli import app

ROOT = Path(__file__).resolve().parents[1]
GROUP = get_command(app)
OUTPUTS = {"out", "preview"}  # path parameters a command writes, not reads
PATH_LIKE = {("archive", "source")}  # inputs typed str: a folder, a glob or a CSV manifest
HEAVY = ("torch", "torchvision", "prefect", "distributed", "matplotlib")


def _leaves(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _leaves(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _groups(group, prefix=()):
    yield prefix, group
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _groups(cmd, (*prefix, name))


LEAVES = dict(_leaves(GROUP))
GROUPS = dict(_groups(GROUP))


def _params(cmd):
    return [p for p in cmd.params if p.name != "help"]


def _annotation(param) -> str:
    return str(param.type_descriptor.annotation)


def _is_input_path(path: tuple, param) -> bool:
    return param.name not in OUTPUTS and ("Path" in _annotation(param) or (path[-1], param.name) in PATH_LIKE)


def _value(path: tuple, param, where: Path) -> str:
    if param.name in OUTPUTS:
        return str(where / "written" / param.name)
    if _is_input_path(path, param):
        return str(where / "missing" / f"{param.name}-input")
    kind = _annotation(param)
    return "1" if "int" in kind else "0.5" if "float" in kind else "v0001"


def _required_args(path: tuple, cmd, where: Path) -> list[str]:
    args: list[str] = []
    for p in _params(cmd):
        if p.required:
            value = _value(path, p, where)
            args += [value] if not p.opts[0].startswith("-") else [p.opts[0], value]
    return args


def invoke(args: list[str]):
    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{args}: escaped the CLI's error policy") from res.exception
    return res


def assert_reported(res, args, usage: bool) -> None:
    text = res.stdout + res.stderr
    assert "unexpected" not in text and "Traceback" not in text, (args, text)
    assert res.stderr.strip(), (args, "nothing on stderr")
    if usage:
        assert res.exit_code == 2, (args, res.exit_code, text)
    else:
        assert res.exit_code not in (0, 1), (args, res.exit_code, text)  # 1 is the code of a bug


def test_the_walk_finds_every_command():
    """Guards the enumeration itself: the commands the README names are all walked."""
    names = {" ".join(p) for p in LEAVES}
    assert {"synth", "tile", "infer", "stitch", "run", "demo", "archive", "report", "patches", "augment",
            "pretrain", "train", "models list", "models promote"} <= names


@pytest.mark.parametrize("path", [p for p, c in LEAVES.items() if any(q.required for q in _params(c))], ids=" ".join)
def test_missing_required_argument_is_a_usage_error(path):
    res = invoke(list(path))
    assert_reported(res, path, usage=True)
    assert "Missing" in res.stderr


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_misspelt_option_is_a_usage_error_with_a_hint(path, tmp_path):
    cmd = LEAVES[path]
    option = next((o for p in _params(cmd) for o in p.opts if o.startswith("--")), "--help")
    typo = option + option[-1]  # --out -> --outt
    args = [*path, *_required_args(path, cmd, tmp_path), typo, "x"]
    res = invoke(args)
    assert_reported(res, args, usage=True)
    assert f"No such option: {typo}" in res.stderr and option in res.stderr.split(typo, 1)[1], res.stderr


def _missing_input_cases():
    for path, cmd in LEAVES.items():
        for p in _params(cmd):
            if _is_input_path(path, p):
                yield pytest.param(path, p.name, id=f"{' '.join(path)} {p.name}")


@pytest.mark.parametrize(("path", "name"), list(_missing_input_cases()))
def test_missing_input_path_is_one_line_naming_it(path, name, tmp_path, monkeypatch):
    """Required parameters filled (inputs that do not exist, outputs in tmp), plus ``name`` pointing
    at a path that does not exist: an error naming a missing path, never work done on nothing."""
    monkeypatch.chdir(tmp_path)  # defaults such as the registry folder resolve in an empty folder
    cmd = LEAVES[path]
    param = next(p for p in _params(cmd) if p.name == name)
    args = [*path, *_required_args(path, cmd, tmp_path)]
    if not param.required:
        args += [param.opts[0], str(tmp_path / "missing" / f"{name}-input")]
    res = invoke(args)
    assert_reported(res, args, usage=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert str(tmp_path / "missing") in lines[-1], (args, res.stderr)
    assert not (tmp_path / "written").exists() or path[-1] in ("synth",), "an output was written for a missing input"


@pytest.mark.parametrize("path", [p for p in GROUPS], ids=lambda p: " ".join(("wsipipe", *p)))
def test_a_group_alone_prints_its_help_and_exits_0(path):
    res = invoke(list(path))
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "Usage" in res.stdout and "Commands" in res.stdout
    assert all(name in res.stdout for name in GROUPS[path].commands)


@pytest.mark.parametrize("path", [p for p in GROUPS], ids=lambda p: " ".join(("wsipipe", *p)))
def test_unknown_and_misspelt_commands_are_usage_errors(path):
    res = invoke([*path, "no-such-command"])
    assert_reported(res, path, usage=True)
    assert "No such command 'no-such-command'" in res.stderr
    first = next(iter(GROUPS[path].commands))
    res = invoke([*path, first[:-1] + first[-1] * 2])  # tile -> tilee
    assert_reported(res, path, usage=True)
    assert f"Did you mean '{first}'?" in res.stderr, res.stderr


def _process(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_entry_point_bare_usage_error_and_version():
    """The real process: ``wsipipe`` alone, a misspelt option, ``--version``; none loads torch or Prefect."""
    res = _process(
        "import json, sys\n"
        "from wsipipe.cli import main\n"
        "codes = []\n"
        "for args in ([], ['run', '--outt', 'x'], ['--version']):\n"
        "    sys.argv = ['wsipipe', *args]\n"
        "    print('@@', args, file=sys.stderr)\n"
        "    print('@@', args)\n"
        "    try:\n"
        "        main()\n"
        "        codes.append(0)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code or 0)\n"
        f"print(json.dumps({{'codes': codes, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 2, 0], res.stdout + res.stderr
    assert report["heavy"] == [], "--help / --version imported " + ", ".join(report["heavy"])
    out, err = res.stdout.split("@@ "), res.stderr.split("@@ ")  # ['', bare, usage error, --version]
    assert "Usage" in out[1] and "Commands" in out[1]
    assert "No such option: --outt" in err[2] and "--out" in err[2].split("--outt", 1)[1]
    shown = dict(line.rsplit(" ", 1) for line in out[3].splitlines()[1:] if line.strip() and not line.startswith("{"))
    import openslide

    assert shown == {
        "wsipipe": __import__("wsipipe").__version__,
        "openslide library": openslide.__library_version__,
        **{name: version(name) for name in ("openslide-python", "torch", "zarr", "dask", "prefect")},
    }


def test_import_and_help_stay_light():
    """Reading slides and asking for help load none of torch, Prefect, Dask distributed, matplotlib."""
    res = _process(
        "import json, sys\n"
        "import wsipipe.slides, wsipipe.slides.slide, wsipipe.slides.tissue\n"
        f"after_slides = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from typer.testing import CliRunner\n"
        "from wsipipe.cli import app\n"
        "codes = [CliRunner().invoke(app, [*cmd, '--help']).exit_code for cmd in ([], ['tile'], ['train'], ['models', 'list'])]\n"
        f"after_help = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'slides': after_slides, 'help': after_help, 'codes': codes}))\n"
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0, 0]
    assert report["slides"] == [], "import wsipipe.slides loaded " + ", ".join(report["slides"])
    assert report["help"] == [], "wsipipe --help loaded " + ", ".join(report["help"])


def test_tile_command_imports_only_what_tiling_needs(slides_dir, tmp_path):
    """A real ``wsipipe tile`` run (2x resampled, so OpenCV's reduction runs too) loads none of
    torch, Prefect, distributed, matplotlib, scikit-image, SciPy or scikit-learn: start-up is
    paid per slide by anyone who tiles slide by slide."""
    slide, out = slides_dir / "cmu-1-small-region.svs", tmp_path / "t.zarr"
    not_needed = (*HEAVY, "skimage", "scipy", "sklearn")
    res = _process(
        "import json, sys\n"
        "from wsipipe.cli import main\n"
        f"sys.argv = ['wsipipe', 'tile', {str(slide)!r}, '--out', {str(out)!r}, '--mpp', '1.0', '--mpp-override', '0.5']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print(json.dumps([m for m in {not_needed!r} if m in sys.modules]))\n"
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [], res.stdout
    assert (out / "zarr.json").exists()
