"""Problems in a user's training data are typed errors naming the store and the problem, reported by
the CLI as one line, and still ValueErrors for callers that caught those before."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.errors import (
    ConfigError,
    ParameterError,
    SlideOpenError,
    StainError,
    TrainingDataError,
    WsipipeError,
)
from wsipipe.learn.patchsets import label_by_regions, split_by_group
from wsipipe.models.stain import StainNormaliser, fit_stain_normaliser


def test_bad_parameters_are_config_errors_and_value_errors():
    with pytest.raises(ParameterError, match=r"max_normal_overlap \(0.5\) < min_overlap \(0.1\)") as info:
        label_by_regions(np.zeros((3, 2)), 10.0, {}, ["Normal", "Tumor"], min_overlap=0.1, max_normal_overlap=0.5)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    with pytest.raises(ParameterError, match=r"split fractions .* got \(0.5, -0.1, 0.6\)"):
        split_by_group(np.array(["a", "b", "c"]), (0.5, -0.1, 0.6))


def test_glass_and_unknown_methods_are_stain_errors():
    glass = np.full((4, 32, 32, 3), 250, np.uint8)
    with pytest.raises(StainError, match="too few stained pixels .*glass") as info:
        fit_stain_normaliser("macenko", glass)
    assert isinstance(info.value, WsipipeError) and isinstance(info.value, ValueError)
    with pytest.raises(StainError, match="unknown stain normaliser 'vahadane'"):
        fit_stain_normaliser("vahadane", glass)
    with pytest.raises(StainError, match="unknown stain normaliser 'x'"):
        StainNormaliser.from_dict({"method": "x"})
    # applying a fitted Macenko normaliser to glass still leaves it as it is (the ValueError it catches)
    tissue = np.random.default_rng(0).integers(60, 200, (2, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(fit_stain_normaliser("macenko", tissue).apply(glass), glass)


@pytest.mark.parametrize("error", [SlideOpenError("a/slide.svs", "file not found"), TrainingDataError(None, "one class"),
                                   ParameterError(None, "need 0 <= x")])
def test_errors_survive_pickling_as_their_own_type(error):
    """Dask and Prefect move exceptions between processes by pickling them."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.path == error.path


def test_train_on_one_class_is_one_line_naming_the_store(tmp_path):
    """A folder-per-class set with a single class: `wsipipe train` says so, naming the store, exit 2."""
    rng = np.random.default_rng(0)
    (tmp_path / "kather" / "TUM").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "kather" / "TUM" / f"t{i}.png")
    runner = CliRunner()
    res = runner.invoke(app, ["patches", str(tmp_path / "kather"), "--out", str(tmp_path / "one.zarr")])
    assert res.exit_code == 0, res.stdout + res.stderr
    res = runner.invoke(app, ["train", str(tmp_path / "one.zarr"), "--out", str(tmp_path / "model")], env={"COLUMNS": "300"})
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("wsipipe")]
    assert res.exit_code == 2, res.stdout + res.stderr
    assert len(lines) == 1 and "unexpected" not in res.stderr, res.stderr
    assert str(tmp_path / "one.zarr") in lines[0] and "need at least two" in lines[0], lines[0]
    assert not (tmp_path / "model" / "model.safetensors").exists()
