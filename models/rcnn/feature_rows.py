"""Row access to a feature matrix larger than memory (R-CNN's pool5 memmap), one chunk of rows at a time.

The SVM pass reads every training region once, image by image. Slicing the ``np.memmap`` directly would
leave every page it touched mapped into the process (its resident set grows to the whole file), and
converting it to float32 -- or computing fc6/fc7 from it -- up front holds the whole matrix. ``ChunkedRows``
instead reads ``chunk_rows`` rows at a time with a plain file read (the file's pages stay in the kernel's
page cache, outside the process), converts them to float32, applies ``transform`` (pool5 -> fc7) to that chunk
only, and serves row slices from it, so a sequential pass holds one chunk, whatever the file's size.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np


def _file_position(a: np.ndarray) -> tuple[str, int] | None:
    """(file name, byte offset of ``a[0]``) of a C-contiguous ``np.memmap`` (or a slice of one), else None."""
    mm = getattr(a, "_mmap", None)
    if not isinstance(a, np.memmap) or mm is None or a.filename is None or not a.flags.c_contiguous:
        return None
    mapping_start = np.frombuffer(mm, np.uint8).ctypes.data  # numpy maps from an allocation-granular offset
    file_start = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY
    return str(a.filename), file_start + (a.ctypes.data - mapping_start)


def read_rows(source: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``source[start:stop]`` as a new in-memory array; a memmap is read with a file read, not mapped."""
    pos = _file_position(source)
    if pos is None:
        return np.array(source[start:stop])
    row_items = int(np.prod(source.shape[1:], dtype=np.int64))
    n = max(0, min(stop, len(source)) - start)
    out = np.fromfile(pos[0], dtype=source.dtype, count=n * row_items,
                      offset=pos[1] + start * row_items * source.dtype.itemsize)
    return out.reshape(n, *source.shape[1:])


class ChunkedRows:
    """``rows[i]`` / ``rows[a:b]`` -> float32 copies of ``transform(source[...])``, read ``chunk_rows`` at a time.

    Sequential access (the SVM pass) reads each chunk once; a slice longer than a chunk is read directly.
    ``transform`` maps an (n x D) float32 array to (n x D') (e.g. ``partial(module.from_pool5, layer="fc7")``)
    and must be row-wise (a row's output depends only on that row).
    """

    def __init__(self, source: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 chunk_rows: int | None = None, chunk_bytes: int = 32 << 20):
        self.source, self.transform = source, transform
        row_bytes = max(1, int(np.prod(source.shape[1:], dtype=np.int64)) * 4)  # as float32
        self.chunk_rows = int(chunk_rows) if chunk_rows else max(1, chunk_bytes // row_bytes)
        self._start, self._chunk = 0, None
        self._dim: int | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int, int]:
        if self._dim is None:
            self._dim = int(self._read(0, 1).shape[1]) if len(self) else int(np.prod(self.source.shape[1:]))
        return len(self), self._dim

    def _read(self, start: int, stop: int) -> np.ndarray:
        x = np.asarray(read_rows(self.source, start, stop), np.float32)
        if self.transform is not None:
            x = np.asarray(self.transform(x), np.float32)
        self._dim = x.shape[1] if x.ndim == 2 else self._dim
        return x

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if stop - start > self.chunk_rows:
            return self._read(start, stop)
        if self._chunk is None or start < self._start or stop > self._start + len(self._chunk):
            self._chunk = None  # release the old chunk before reading the next
            self._start, self._chunk = start, self._read(start, min(len(self), start + self.chunk_rows))
        return self._chunk[start - self._start: stop - self._start].copy()  # a view would pin the chunk

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return self._rows(i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ChunkedRows supports contiguous slices only")
            return self._rows(start, max(start, stop))
        raise TypeError(f"ChunkedRows indices are ints or slices, not {type(key).__name__}")


class RegionIndex:
    """Images whose regions are stacked as rows of one feature matrix: image ``i`` owns rows
    ``offsets[i]:offsets[i + 1]``. Subclasses set ``ids`` and ``offsets`` (R-CNN's and segmentation's splits)."""

    ids: list[str]
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_regions(self) -> int:
        return int(self.offsets[-1])

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))
