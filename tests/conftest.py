"""Shared fixtures. Real slide files live in ../shared/data beside the project root."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SLIDES = SHARED / "slides"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    if not SLIDES.is_dir():
        pytest.fail(f"real test slides not found at {SLIDES} (../shared/data beside the project root)")
    return SLIDES
