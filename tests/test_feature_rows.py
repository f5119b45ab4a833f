"""ChunkedRows: R-CNN's SVM pass over the pool5 memmap, one chunk at a time, gives exactly the rows (and the
SVMs) that the whole matrix in memory gives."""

from __future__ import annotations

import numpy as np
import pytest

from models.rcnn.feature_rows import ChunkedRows, read_rows
from models.rcnn.svm import train_svms


@pytest.fixture()
def pool5(tmp_path):
    a = np.random.default_rng(0).standard_normal((300, 12)).astype(np.float16)
    path = tmp_path / "pool5.dat"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=a.shape)
    mm[:] = a
    mm.flush()
    del mm
    return a, path


def test_read_rows_reads_the_file_not_the_mapping(pool5):
    a, path = pool5
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=a.shape)
    assert np.array_equal(read_rows(mm, 5, 17), a[5:17])
    assert np.array_equal(read_rows(mm[100:], 3, 9), a[103:109])  # a slice of a memmap knows its offset
    offset = np.memmap(path, dtype=np.float16, mode="r", shape=(290, 12), offset=10 * 12 * 2)
    assert np.array_equal(read_rows(offset, 0, 4), a[10:14])
    assert not isinstance(read_rows(mm, 0, 3), np.memmap)
    assert np.array_equal(read_rows(a, 2, 4), a[2:4])  # an in-memory array is sliced


def test_chunked_rows_match_the_whole_matrix(pool5):
    a, path = pool5
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=a.shape)
    rows = ChunkedRows(mm, lambda x: np.maximum(x @ np.ones((12, 5), np.float32), 0), chunk_rows=32)
    full = np.maximum(a.astype(np.float32) @ np.ones((12, 5), np.float32), 0)
    assert rows.shape == (300, 5) and len(rows) == 300
    assert all(np.array_equal(rows[i], full[i]) for i in range(300))
    assert np.array_equal(rows[10:250], full[10:250])  # longer than a chunk: read directly
    assert np.array_equal(rows[290:400], full[290:]) and np.array_equal(rows[-1], full[-1])
    kept = rows[40:42]
    assert kept.base is None or kept.base is not rows._chunk  # a copy: keeping it must not pin the chunk
    with pytest.raises(IndexError):
        rows[300]
    with pytest.raises(IndexError):
        rows[0:10:2]


def test_svms_from_chunks_equal_svms_from_memory(pool5):
    a, path = pool5
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=a.shape)
    chunked, full = ChunkedRows(mm, chunk_rows=16), a.astype(np.float32)
    rng = np.random.default_rng(1)
    masks = [rng.random((30, 2)) < 0.8 for _ in range(10)]
    positives = [full[:8] + 2, full[8:16] - 2]
    kw = {"retrain_limit": 40, "max_cache": 60}
    a_svm = train_svms([(full[30 * i: 30 * i + 30], m) for i, m in enumerate(masks)], positives, **kw)
    b_svm = train_svms([(chunked[30 * i: 30 * i + 30], m) for i, m in enumerate(masks)], positives, **kw)
    assert a_svm.retrains.sum() >= 2
    assert np.array_equal(a_svm.W, b_svm.W) and np.array_equal(a_svm.b, b_svm.b)
