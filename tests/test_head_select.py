"""The screened head's compiled selection and exact rows (kernels/head_select.py) against numpy references: the
candidate set the screen's proof needs (every row whose upper bound reaches the k-th best lower bound, plus the
kept ids) and f16_matmul's own logits, read from the file or from the map."""
import numpy as np
import pytest

from bitnet_py.screened_head import quantize_head, screened_logits
from bitnet_py.sampling import TopRequest
from kernels.dense import f16_matmul
from kernels.head_select import exact_rows, kth_largest, select_rows

RNG = np.random.default_rng(11)


def _reference_candidates(lower, upper, k, keep):
    """The numpy steps the kernel replaces: keep ranked from exact values, the k-th largest lower bound of the
    others (np.partition), every row whose upper bound reaches it, and keep."""
    lo = lower.copy()
    lo[keep] = -np.inf
    cut = np.partition(lo, lo.size - k)[lo.size - k]
    return np.union1d(np.flatnonzero(upper >= cut), keep)


def _bounds(M, ties=False):
    lower = RNG.standard_normal(M).astype(np.float32)
    if ties:
        lower = np.round(lower, 1).astype(np.float32)  # many equal values: duplicates counted in the k-th
    upper = lower + RNG.random(M).astype(np.float32) * np.float32(0.3)
    lower[::97] = -np.inf  # rows with no bound
    upper[::97] = np.inf
    if M > 5:
        lower[5], upper[5] = -0.0, 0.0
    return lower, upper


@pytest.mark.parametrize("M,k", [(1, 1), (70, 1), (70, 3), (1000, 1), (1000, 40), (5000, 256), (129, 128)])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_largest_is_np_partition(M, k, ties):
    values = _bounds(M, ties)[0]
    assert kth_largest(values, k) == np.partition(values, M - k)[M - k]


def test_max_handles_signs_and_infinities():
    for values in ([-3.0, -1.0, -2.0], [-np.inf, -np.inf], [-0.0, -1.0], [0.0, -0.0], [1e-40, -1e-40], [-5, np.inf]):
        v = np.array(values, np.float32)
        assert kth_largest(v, 1) == v.max()


@pytest.mark.parametrize("k", [1, 2, 40, 256])
@pytest.mark.parametrize("n_keep", [0, 1, 7])
@pytest.mark.parametrize("ties", [False, True])
def test_selected_rows_are_the_reference_candidates(k, n_keep, ties):
    M = 3000
    lower, upper = _bounds(M, ties)
    keep = np.unique(RNG.integers(0, M, n_keep)).astype(np.int64)
    ref = _reference_candidates(lower, upper, k, keep)
    ids = np.full(M, -1, np.int64)
    n = select_rows(lower.copy(), upper, k, keep, ids)
    assert np.array_equal(np.sort(ids[:n]), ref)
    assert len(set(ids[:n].tolist())) == n  # no id twice (keep ids among the candidates are not added again)


def _head(M=600, K=256 + 8):
    w16 = (RNG.standard_normal((M, K)) * 0.05).astype(np.float16)
    return w16.view(np.uint16)


@pytest.mark.parametrize("K", [256, 264, 20])
def test_exact_rows_are_f16_matmul_bits_from_the_file_and_from_the_map(tmp_path, K):
    w = _head(K=K)
    y = (RNG.standard_normal((3, K))).astype(np.float16).astype(np.float32)
    full = np.empty((3, w.shape[0]), np.float32)
    f16_matmul(w, y, full)
    path = tmp_path / "head.bin"
    pad = 1000
    path.write_bytes(b"\0" * pad + w.tobytes())
    ids = np.array([0, 599, 17, 18, 300], np.int64)
    import os
    fd = os.open(path, os.O_RDONLY)
    try:
        for t in range(3):
            for source in ((fd, pad), (-1, 0)):
                out = np.zeros(w.shape[0], np.float32)
                assert exact_rows(w, *source, ids, y, t, np.empty((ids.size, K), np.uint16), out) == -1
                assert np.array_equal(out[ids], full[t, ids])
                assert np.isneginf(np.delete(out, ids)).all()
        # a file shorter than the head: the first id past its end is reported, nothing written
        os.truncate(path, pad + 2 * K * 100)
        out = np.zeros(w.shape[0], np.float32)
        assert exact_rows(w, fd, pad, ids, y, 0, np.empty((ids.size, K), np.uint16), out) == 599
        assert not out.any()
    finally:
        os.close(fd)


def test_screened_logits_from_a_truncated_file_raise(tmp_path):
    w = _head(M=3000, K=256)
    head = quantize_head(w)
    y = (RNG.standard_normal((1, 256))).astype(np.float16).astype(np.float32)
    path = tmp_path / "head.bin"
    path.write_bytes(w[:10].tobytes())  # the candidates lie past the end
    import os
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="short read"):
            screened_logits(w, head, y, [TopRequest(1, np.array([2000], np.int64))], (fd, 0))
        with pytest.raises(IndexError):
            screened_logits(w, head, y, [TopRequest(1, np.array([3000], np.int64))], (fd, 0))
    finally:
        os.close(fd)
