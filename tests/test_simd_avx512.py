"""The screened head's int8 x int16 dots in both forms against numpy: the 256-bit one (kernels.simd_dense, every
AVX2 host) and the 512-bit one (kernels.simd_avx512, AVX-512 hosts, where kernels.head_screen uses it), for row
lengths that leave every remainder of the four-chunk loop, with extreme values."""
import numpy as np
import pytest
from numba import njit

from kernels.head_screen import activation_max
from kernels.simd import HAVE_AVX2, HAVE_AVX512

FORMS = [pytest.param("simd_dense", marks=pytest.mark.skipif(not HAVE_AVX2, reason="the host has no AVX2")),
         pytest.param("simd_avx512", marks=pytest.mark.skipif(
             not HAVE_AVX512, reason="the host has no AVX-512 BW + VNNI (or BITNET_PY_AVX512=0)"))]


def _dots(module_name):
    module = __import__(f"kernels.{module_name}", fromlist=["i8_i16_dot1"])
    dot1, dot2, dot4 = module.i8_i16_dot1, module.i8_i16_dot2, module.i8_i16_dot4

    @njit(cache=False)
    def dots(w, w0, x, K, out):
        """Rows 0-3 of x against the weights at w0: out[0:4] four at once, out[4:6] two, out[6] one."""
        n = K // 32
        out[0], out[1], out[2], out[3] = dot4(w, w0, x, 0, K, n)
        out[4], out[5] = dot2(w, w0, x, 0, K, n)
        out[6] = dot1(w, w0, x, 0, K, n)

    return dots


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("K", [32, 64, 96, 128, 160, 224, 2560, 2592, 6912])
def test_int8_int16_dots_are_exact(form, K):
    rng = np.random.default_rng(K)
    p_max = activation_max(K)  # the largest activation code kernels.head_screen makes for this K
    w = rng.integers(-127, 128, 2 * K).astype(np.int8)  # two rows: the dots read the second (w0 = K)
    w[K::3] = rng.choice(np.int8([-127, 127]), len(w[K::3]))
    x = rng.integers(-p_max, p_max + 1, (4, K)).astype(np.int16)
    x[1] = np.where(w[K:] < 0, -p_max, p_max)  # every product of row 1 at the largest size of one sign
    out = np.zeros(7, np.int64)
    _dots(form)(w, K, x.reshape(-1), K, out)
    want = (w[K:].astype(np.int64) * x.astype(np.int64)).sum(axis=1)
    np.testing.assert_array_equal(out, np.concatenate([want, want[:2], want[:1]]))


@pytest.mark.skipif(not HAVE_AVX512, reason="the host has no AVX-512 BW + VNNI (or BITNET_PY_AVX512=0)")
def test_screen_uses_the_512_bit_dot_where_the_host_has_it():
    from kernels import head_screen, simd_avx512
    assert head_screen.i8_i16_dot1 is simd_avx512.i8_i16_dot1
    dots = _dots("simd_avx512")
    dots(np.ones(64, np.int8), 0, np.ones(128, np.int16), 32, np.zeros(7, np.int64))
    asm = "".join(dots.inspect_asm().values())
    assert "vpdpwssd" in asm and "zmm" in asm


def test_avx512_switch_picks_the_256_bit_dot_and_its_own_cache_folder():
    from conftest import run_fresh_python
    run_fresh_python("from kernels import config, head_screen, simd_dense\n"
                     "assert head_screen.i8_i16_dot1 is simd_dense.i8_i16_dot1\n"
                     "assert config.CACHE_DIR.endswith('-noavx512'), config.CACHE_DIR\n",
                     timeout=120, BITNET_PY_AVX512="0", BITNET_PY_VNNI="1")
