"""Slow, obviously-right numpy references for every kernel in kernels/."""
import numpy as np


def quantize_rows_i8(x, floor):
    amax = np.maximum(np.abs(x.astype(np.float64)).max(axis=1), floor)
    s = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1.0), 1.0).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s, q.astype(np.int64).sum(axis=1).astype(np.int32)


def ternary_matmul(w_ternary, q, s, scale):
    """w: i8[M, K] in {-1,0,1}; q: i8[T, K] -> f32[T, M] = float32(int dot) / s * scale."""
    dot = q.astype(np.int64) @ w_ternary.astype(np.int64).T  # exact
    return (dot.astype(np.float32) / s[:, None]) * np.float32(scale)


def rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x, positions, base, neox, n_dims):
    x = x.astype(np.float64).copy()
    half = n_dims // 2
    inv = base ** (-2.0 * np.arange(half) / n_dims)
    ang = positions[:, None].astype(np.float64) * inv[None, :]  # [T, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:n_dims].copy()
        x[..., :half], x[..., half:n_dims] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:n_dims:2].copy(), x[..., 1:n_dims:2].copy()
        x[..., 0:n_dims:2], x[..., 1:n_dims:2] = a * c - b * s, a * s + b * c
    return x


def heads_first(rows):
    """Cache rows [n_slots, KVH, D] -> the KV cache's layout [KVH, n_slots, D] (each head's rows contiguous)."""
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


def attention(q, k_seq, v_seq, n_visible, scale, round_probs):
    """q: [H, D]; k_seq, v_seq: f32 [N, KVH, D]; attends to the first n_visible positions."""
    H, D = q.shape
    group = H // k_seq.shape[1]
    out = np.zeros((H, D))
    for h in range(H):
        k = k_seq[:n_visible, h // group].astype(np.float64)
        v = v_seq[:n_visible, h // group].astype(np.float64)
        sc = k @ q[h].astype(np.float64) * scale
        p = np.exp(sc - sc.max())
        p /= p.sum()
        if round_probs:
            p = p.astype(np.float16).astype(np.float64)
        out[h] = p @ v
    return out


def silu_mul(g, u):
    g64 = g.astype(np.float64)
    return g64 / (1 + np.exp(-g64)) * u


def relu2_mul(g, u):
    return np.maximum(g.astype(np.float64), 0) ** 2 * u
