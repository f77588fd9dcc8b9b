"""A lossy Zarr v3 codec for patch arrays: each (H, W, 3) uint8 patch of a chunk as one JPEG.

Real H&E, already JPEG-compressed by the scanner, shrinks only ~1.15x losslessly (zstd);
re-encoding each patch as JPEG at quality 95 with full-resolution chroma stores it ~4x
smaller at a mean error of ~1 grey level (PSNR ~44 dB), and encodes faster than zstd
writes (see BENCHMARKS.md, storage). Chosen with ``tile.codec: jpeg``; the default stays
lossless.

Chunk layout: a little-endian uint32 count n, n uint32 byte lengths, then the n JPEG
streams. Importing this module registers the codec as ``wsipipe.jpeg`` (wsipipe.tiles.store
imports it, so every stage can read such stores).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

NAME = "wsipipe.jpeg"


@dataclass(frozen=True)
class JpegPatchCodec(ArrayBytesCodec):
    """Array -> bytes codec for (N, H, W, 3) uint8 chunks (any N; H, W up to 65535)."""

    is_fixed_size = False
    level: int = 95

    def __init__(self, *, level: int = 95) -> None:
        if not 1 <= int(level) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {level}")
        object.__setattr__(self, "level", int(level))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> JpegPatchCodec:
        _, config = parse_named_configuration(data, NAME, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": NAME, "configuration": {"level": self.level}}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if dtype.to_native_dtype() != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{NAME} stores (N, H, W, 3) uint8 patch arrays, not shape {shape} of {dtype}")

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        patches = np.asarray(chunk_array.as_ndarray_like())
        # 4:4:4 (no chroma subsampling): H&E's thin purple/pink edges are where 4:2:0 loses most.
        streams = [imagecodecs.jpeg8_encode(np.ascontiguousarray(p), level=self.level, subsampling=(1, 1))
                   for p in patches]
        header = np.array([len(streams), *map(len, streams)], "<u4").tobytes()
        return chunk_spec.prototype.buffer.from_bytes(header + b"".join(streams))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        data = chunk_bytes.to_bytes()
        n = int(np.frombuffer(data, "<u4", 1)[0])
        sizes = np.frombuffer(data, "<u4", n, 4)
        out = np.empty(chunk_spec.shape, np.uint8)
        pos = 4 * (n + 1)
        for k, size in enumerate(sizes.tolist()):
            out[k] = imagecodecs.jpeg8_decode(data[pos : pos + size])
            pos += size
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)  # type: ignore[arg-type]  # zarr's NDArrayLike protocol predates numpy 2 stubs

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(NAME, JpegPatchCodec)
