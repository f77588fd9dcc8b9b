"""The store layout is named in one place: every array in store.LAYOUT, as the docs' store
layout page and the module docstring list them, and typed access that names the store on a missing array."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from wsipipe.errors import StoreError
from wsipipe.tiles import store

LAYOUT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "store-layout.md"


def test_layout_lists_every_array_once():
    assert len(store.LAYOUT) == len(set(store.LAYOUT)) == 14
    assert store.progress_name(store.STAGE_TILE) == "_progress/tile"


def test_docstring_and_docs_list_the_same_arrays():
    doc = store.__doc__ or ""
    for name in store.LAYOUT:
        assert re.search(rf"^\s+{re.escape(name)}\s", doc, re.M), f"{name} missing from the store docstring"
    section = LAYOUT_PAGE.read_text().split("## Arrays and attributes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"`([a-z_/<>]+)`", section)
    assert [n for n in listed if n in store.LAYOUT] == list(store.LAYOUT)


def test_typed_access(tmp_path):
    group = store.open_store(tmp_path / "s.zarr", mode="w")
    group.create_array(store.COORDS, data=np.zeros((3, 2), np.int64))
    group.create_group(store.QC_GROUP)
    assert store.array(group, store.COORDS).shape == (3, 2)
    assert store.optional_array(group, store.PROBABILITIES) is None
    with pytest.raises(StoreError, match="no array 'patches'") as info:
        store.array(group, store.PATCHES)
    assert info.value.path == tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="'qc' is not an array"):
        store.optional_array(group, store.QC_GROUP)
    flags = store.progress_array(group, "infer", 4)
    assert store.array(group, store.progress_name("infer")).shape == (4,) and store.pending_chunks(flags) == [0, 1, 2, 3]
