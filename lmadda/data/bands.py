"""Whole-image statistics of an image read block by block, so that a whole-slide image is never in memory at once.

`model_input` normalises an image by each channel's own percentiles and may histogram-match it: both are statistics
of the whole image. Here they are computed from blocks of about BLOCK_VALUES values (whole chunks of an OME-Zarr
image, so each chunk is decompressed once a pass), exactly equal to what the in-memory functions give on the whole
image (tests/test_omezarr.py):

- percentiles: a radix select on the float32 values' order-preserving 32-bit keys, two passes of 65 536 counts per
  channel (the high 16 bits, then the low 16 bits of the buckets that hold the wanted ranks), then numpy's 'linear'
  interpolation between the two neighbouring order statistics, in float64 as `np.percentile` does it;
- value counts: each distinct value and how often it occurs, merged band by band. Memory grows with the number of
  distinct values: at most 65 536 per channel for 8- to 16-bit cameras, up to one per pixel for float images.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

import numpy as np

from lmadda.core.errors import LmaddaError

BLOCK_VALUES = 1 << 20  # values per block read for statistics: 4 MB of float32 (and a few times that while counting)


class RegionSource(Protocol):
    """An image read on demand: float32 (C, height, width) camera units of any region, stored in (rows, columns) `chunks`."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def chunks(self) -> tuple[int, int]: ...

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray: ...


def blocks(source: RegionSource, values: int = BLOCK_VALUES) -> Iterator[np.ndarray]:
    """float32 (C, h, w) blocks that cover `source` once: whole rows of chunks, as many as make about `values` values,
    or, for an image too wide for that, whole chunks side by side along one row of chunks."""
    channels, height, width = source.shape
    chunk_rows, chunk_columns = source.chunks
    if channels * width * chunk_rows <= values:
        rows, columns = max(1, values // (channels * width)) // chunk_rows * chunk_rows, width
    else:
        rows, columns = chunk_rows, max(1, values // (channels * chunk_rows)) // chunk_columns * chunk_columns or chunk_columns
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            yield source.read(top, left, min(rows, height - top), min(columns, width - left))


# ---- exact percentiles --------------------------------------------------------------------------
def _keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys that sort as the float32 `values` do (sign bit set for positives, all bits flipped for negatives)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def _value(key: int) -> float:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def order_statistics(source: RegionSource, ranks: list[int], values: int = BLOCK_VALUES) -> np.ndarray:
    """(C, len(ranks)) float64: the value at each 0-based rank of each channel's sorted values."""
    channels, height, width = source.shape
    count = height * width
    if any(not 0 <= rank < count for rank in ranks):
        raise ValueError(f"ranks {ranks} outside 0..{count - 1}")
    high = np.zeros((channels, 1 << 16), np.int64)
    for block in blocks(source, values):
        keys = _keys(block).reshape(channels, -1)
        for channel in range(channels):
            high[channel] += np.bincount(keys[channel] >> 16, minlength=1 << 16)
    cumulative = np.cumsum(high, axis=1)
    buckets = [[int(np.searchsorted(cumulative[channel], rank, side="right")) for rank in ranks] for channel in range(channels)]
    low = {(channel, bucket): np.zeros(1 << 16, np.int64) for channel in range(channels) for bucket in buckets[channel]}
    for block in blocks(source, values):
        keys = _keys(block).reshape(channels, -1)
        for channel in range(channels):
            top_bits = keys[channel] >> 16
            for bucket in set(buckets[channel]):
                low[(channel, bucket)] += np.bincount(keys[channel][top_bits == bucket] & 0xFFFF, minlength=1 << 16)
    found = np.empty((channels, len(ranks)), np.float64)
    for channel in range(channels):
        for index, (rank, bucket) in enumerate(zip(ranks, buckets[channel])):
            below = int(cumulative[channel, bucket - 1]) if bucket else 0
            within = int(np.searchsorted(np.cumsum(low[(channel, bucket)]), rank - below, side="right"))
            found[channel, index] = _value((bucket << 16) | within)
    return found


def percentiles(source: RegionSource, levels: list[float], values: int = BLOCK_VALUES) -> np.ndarray:
    """(C, len(levels)) float64: each channel's percentiles at `levels` (0..100), equal to `np.percentile` of the whole
    channel (method 'linear': the two order statistics around (n - 1) * q, interpolated as numpy does)."""
    _, height, width = source.shape
    count = height * width
    positions = []
    for level in levels:
        virtual = (count - 1) * np.true_divide(level, 100)
        previous = min(int(math.floor(virtual)), count - 1)
        positions.append((float(virtual), previous, min(previous + 1, count - 1)))
    ranks = sorted({rank for _, previous, following in positions for rank in (previous, following)})
    stats = order_statistics(source, ranks, values)
    at = {rank: index for index, rank in enumerate(ranks)}
    result = np.empty((stats.shape[0], len(levels)), np.float64)
    for index, (virtual, previous, following) in enumerate(positions):
        below, above = stats[:, at[previous]], stats[:, at[following]]
        if virtual >= count - 1:  # the 100th percentile (numpy takes the last value)
            result[:, index] = above
            continue
        gamma = virtual - previous
        difference = above - below
        # numpy's _lerp: a + (b - a) t, and b - (b - a)(1 - t) where t >= 0.5, for the same rounding
        result[:, index] = above - difference * (1 - gamma) if gamma >= 0.5 else below + difference * gamma
    return result


# ---- exact value counts -------------------------------------------------------------------------
class ValueCounts:
    """Distinct values and how often each occurs, merged block by block (`np.unique(..., return_counts=True)` of the whole)."""

    def __init__(self) -> None:
        self.values = np.empty(0, np.float32)
        self.counts = np.empty(0, np.int64)

    def add(self, block: np.ndarray) -> None:
        values, counts = np.unique(block, return_counts=True)
        merged, inverse = np.unique(np.concatenate([self.values, values.astype(np.float32)]), return_inverse=True)
        self.counts = np.bincount(inverse, weights=np.concatenate([self.counts, counts]), minlength=merged.size).astype(np.int64)
        self.values = merged

    def index(self, band: np.ndarray) -> np.ndarray:
        """Each value's index in `values` (every value of a band that was added is there)."""
        indices = np.searchsorted(self.values, band)
        if indices.size and (indices.max() >= self.values.size or not np.array_equal(self.values[indices], band)):
            raise LmaddaError("the image changed while it was being read (a value not seen when its statistics were taken); "
                              "predict again once it is written completely")
        return indices
