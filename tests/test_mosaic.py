"""Benchmark slides of real tissue: a real OpenSlide file whose tiles are the source's pixels."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from wsipipe.slides.mosaic import GLASS_RGB, orient, read_source, write_mosaic_slide
from wsipipe.slides.slide import composite_rgba


def test_mosaic_is_a_pyramidal_svs_of_real_source_tiles(slides_dir, tmp_path):
    source = read_source(slides_dir / "cmu-1-small-region.svs")
    m = write_mosaic_slide(tmp_path / "m.svs", 4608, 4352, source, mpp=0.5, seed=3, pool_size=12, n_tissue=1)
    with openslide.OpenSlide(str(m.path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.dimensions == (4608, 4352)
        assert s.level_dimensions[1] == (1152, 1088) and s.level_downsamples[1] == pytest.approx(4.0)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        rows, cols = np.nonzero(m.choice >= 0)
        assert 0 < len(rows) < m.choice.size  # tissue and glass both present
        t = m.tile_size
        for r, c in list(zip(rows, cols, strict=True))[:: max(1, len(rows) // 6)]:
            k = int(m.choice[r, c])
            got = composite_rgba(np.asarray(s.read_region((int(c) * t, int(r) * t), 0, (t, t)))).astype(int)
            x, y = m.pool.origins[k]
            q, f = m.pool.turns[k]
            want = orient(source[y : y + t, x : x + t], int(q), bool(f)).astype(int)
            # The real source tile up to one JPEG re-encoding (quality 90, 4:2:0 chroma: ~5 grey levels mean).
            assert np.abs(got - want).mean() < 8.0
            other = orient(source[y : y + t, x : x + t], int(q) + 1, bool(f)).astype(int)
            assert np.abs(got - other).mean() > 20.0  # the check can tell tiles apart
        r, c = np.argwhere(m.choice < 0)[0]
        glass = composite_rgba(np.asarray(s.read_region((int(c) * t, int(r) * t), 0, (t, t)))).astype(int)
        assert np.abs(glass - np.array(GLASS_RGB)).max() <= 3
