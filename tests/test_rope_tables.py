"""Rope tables are the same bits on every host: no value in them is decided by numpy's CPU-dispatched
transcendental functions (SVML on AVX-512 hosts), which can differ from the C library's by an ulp."""
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest

from kernels import rope

# (base, rope dims): tiny-bitnet, 2B-4T, Llama-3 and others (not tiny-llama's (10000, 128): its power is a near-tie)
SHAPES = [(10000.0, 64), (500000.0, 128), (500000.0, 64), (1000000.0, 128), (10000.0, 96)]


def _correctly_rounded_pow_f32(base: float, n_dims: int) -> np.float32:
    """float32 nearest to base^(-2/n_dims) (the exponent as float32 division gives it), from 60-digit decimals."""
    getcontext().prec = 60
    exponent = np.float32(-2.0) / np.float32(n_dims)
    exact = (Decimal(float(exponent)) * Decimal(float(np.float32(base))).ln()).exp()
    low = np.float32(float(exact))
    if Decimal(float(low)) > exact:
        low = np.nextafter(low, np.float32(0))
    high = np.nextafter(low, np.float32(np.inf))
    below, above = exact - Decimal(float(low)), Decimal(float(high)) - exact
    assert abs(below - above) > (above + below) / 100, "a near-tie: pick another shape for this test"
    return low if below < above else high


@pytest.mark.parametrize("base,n_dims", SHAPES)
def test_theta_scale_is_the_correctly_rounded_power(base, n_dims):
    assert rope.theta_scale(base, n_dims) == _correctly_rounded_pow_f32(base, n_dims)


def test_tables_do_not_come_from_numpys_power(monkeypatch):
    """An AVX-512 host's numpy power one ulp off (what SVML can return) leaves the tables unchanged."""
    want = rope.rope_tables(300, 64, 10000.0)
    real_power = np.power

    def power_one_ulp_up(*args, **kwargs):
        return np.nextafter(real_power(*args, **kwargs), np.float32(np.inf))

    monkeypatch.setattr(np, "power", power_one_ulp_up)
    got = rope.rope_tables(300, 64, 10000.0)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def _shift_ulps(values, n):
    out = values
    for _ in range(abs(n)):
        out = np.nextafter(out, np.inf if n > 0 else -np.inf)
    return out


def test_values_near_a_float32_midpoint_are_decided_by_the_c_library(monkeypatch):
    """cos(2^-12) = 1 - 2^-25 + 2^-48/24 - ...: a hair above the midpoint between 1 - 2^-24 and 1, so a float64
    cos a few ulps low would round the other way. Such values are recomputed with math.cos / math.sin."""
    near_tie = np.float32(2.0 ** -12)
    getcontext().prec = 60
    x = Decimal(2) ** -12
    exact_cos = 1 - x * x / 2 + x ** 4 / 24 - x ** 6 / 720
    assert Decimal(1) - exact_cos < Decimal(2) ** -25  # above the midpoint: correctly rounded to 1.0
    angles = np.array([[near_tie, 0.0, 1.0, 2047.0 * 0.75 ** 40], [3.0, 100.0, 1e-3, 2047.0]], np.float32)
    real_cos, real_sin = np.cos, np.sin
    monkeypatch.setattr(np, "cos", lambda a: _shift_ulps(real_cos(a), -4))
    monkeypatch.setattr(np, "sin", lambda a: _shift_ulps(real_sin(a), 4))
    cos, sin = rope.cos_sin_f32(angles)
    assert cos[0, 0] == np.float32(1.0)
    assert _shift_ulps(real_cos(np.float64(near_tie)), -4).astype(np.float32) != np.float32(1.0)  # unguarded
    want_cos = np.vectorize(lambda a: np.float32(math.cos(float(a))), otypes=[np.float32])(angles)
    want_sin = np.vectorize(lambda a: np.float32(math.sin(float(a))), otypes=[np.float32])(angles)
    assert np.array_equal(cos, want_cos) and np.array_equal(sin, want_sin)


@pytest.mark.parametrize("freq_scale", [1.0, 0.3])
def test_tables_follow_ggmls_theta_recurrence(freq_scale):
    """theta_0 = pos, theta_{i+1} = theta_i * scale in float32; angle = freq_scale * theta (ggml's rope cache),
    replayed one position at a time in plain Python floats rounded to float32."""
    n_pos, n_dims, base = 1500, 32, 10000.0  # > one TABLE_CHUNK
    cos, sin = rope.rope_tables(n_pos, n_dims, base, freq_scale)
    scale = rope.theta_scale(base, n_dims)
    for pos in (0, 1, 2, 1023, 1024, 1499):
        theta = np.float32(pos)
        for i in range(n_dims // 2):
            angle = theta if freq_scale == 1.0 else np.float32(np.float32(freq_scale) * theta)
            assert cos[pos, i] == np.float32(math.cos(float(angle))), (pos, i)
            assert sin[pos, i] == np.float32(math.sin(float(angle))), (pos, i)
            theta = np.float32(theta * scale)
