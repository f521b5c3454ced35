"""Triton kernels (featcal.kernels) against float64 references.

On the CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
`cuda` tests run the compiled kernels (TRITON_INTERPRET=0 on a GPU machine). Error bounds are
elementwise: |got - want| <= tol(dtype) * (|x|^T |w| |y|), where tol covers the one rounding of
w * x to a 16-bit input dtype before the matrix units; integer-valued inputs must match exactly.
"""

import pytest
import torch

kernels = pytest.importorskip("featcal.kernels")
from featcal.kernels import column_sum, norm_statistics, weighted_product  # noqa: E402
from featcal.kernels.autotune import TileConfig  # noqa: E402

NS = [1, 37, 129, 300]
DS = [9, 33, 70, 128, 257]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(
    params=[pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]
)
def device(request):
    if request.param == "cpu" and not kernels.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    if request.param == "cuda" and (kernels.INTERPRETED or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0")
    return torch.device(request.param)


def _tol(dtype, device):
    """Relative (to |x|^T |w| |y|) error allowed for products of inputs of `dtype`."""
    rounded = dtype != torch.float32 and not (
        device.type == "cpu" and dtype == torch.bfloat16  # the interpreter upcasts bf16
    )
    return 2 * UNIT_ROUNDOFF[dtype] if rounded else 1e-5


def _data(n, d, dtype, device, seed, weighted=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype).to(device)
    w = None
    if weighted:
        w = torch.rand(n, generator=gen)
        w[1::3] = 0  # padding
        w = w.to(device)
    return x, w


def _assert_close(got, want, bound, tol, what):
    err = (got.double().cpu() - want.cpu()).abs()
    limit = tol * bound.cpu() + 1e-30
    worst = (err / limit).max().item()
    assert worst <= 1, f"{what}: error {err.max().item():.2e}, {worst:.2f} x the allowed bound"


def _abs_bound(x, y, w):
    return weighted_product.reference(x.abs(), y.abs(), None if w is None else w.abs())


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_gram_fp32_every_shape(device, n, d):
    x, w = _data(n, d, torch.float32, device, seed=n * 1000 + d)
    out = torch.zeros(d, d, device=device)
    total = torch.zeros(d, device=device)
    kernels.weighted_gram(x, w, out, out_sum=total)
    _assert_close(out, weighted_product.reference(x, x, w), _abs_bound(x, x, w), 1e-5, "gram")
    _assert_close(total, column_sum.reference(x, w), column_sum.reference(x.abs(), w), 1e-5, "sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(37, 70), (300, 257), (129, 128)])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_gram_lower_tiles_and_mirror(device, dtype, n, d, weighted):
    x, w = _data(n, d, dtype, device, seed=d, weighted=weighted)
    out = torch.zeros(d, d, device=device)
    kernels.weighted_gram(x, w, out, lower_only=True)
    kernels.mirror_lower(out)
    _assert_close(out, weighted_product.reference(x, x, w), _abs_bound(x, x, w), _tol(dtype, device), "gram")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,dx,dy", [(1, 9, 33), (37, 33, 9), (300, 70, 257), (129, 257, 128)])
def test_cross_and_its_column_sums(device, dtype, n, dx, dy):
    x, w = _data(n, dx, dtype, device, seed=dx * 7 + dy)
    y, _ = _data(n, dy, dtype, device, seed=dy * 11, weighted=False)
    out = torch.zeros(dx, dy, device=device)
    total = torch.zeros(dy, device=device)
    kernels.weighted_cross(x, y, w, out, out_sum_y=total)
    tol = _tol(dtype, device)
    _assert_close(out, weighted_product.reference(x, y, w), _abs_bound(x, y, w), tol, "cross")
    _assert_close(total, column_sum.reference(y, w), column_sum.reference(y.abs(), w), 1e-5, "sum of y")


def test_cross_of_mixed_dtypes(device):
    x, w = _data(129, 70, torch.bfloat16, device, seed=3)
    y, _ = _data(129, 33, torch.float32, device, seed=4)
    out = kernels.weighted_cross(x, y, w, torch.zeros(70, 33, device=device))
    _assert_close(out, weighted_product.reference(x, y, w), _abs_bound(x, y, w), 1e-5, "cross")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_inputs_are_exact(device, dtype):
    """Small integers and weights in {0, 0.5, 1}: every product and sum is exact in float32."""
    gen = torch.Generator().manual_seed(5)
    n, d = 300, 70
    x = torch.randint(-8, 9, (n, d), generator=gen).to(dtype).to(device)
    y = torch.randint(-8, 9, (n, 33), generator=gen).to(dtype).to(device)
    w = (torch.randint(0, 3, (n,), generator=gen) / 2).to(device)
    gram, total = torch.zeros(d, d, device=device), torch.zeros(d, device=device)
    kernels.weighted_gram(x, w, gram, lower_only=True, out_sum=total)
    kernels.mirror_lower(gram)
    cross, total_y = torch.zeros(d, 33, device=device), torch.zeros(33, device=device)
    kernels.weighted_cross(x, y, w, cross, out_sum_y=total_y)
    assert torch.equal(gram.double().cpu(), weighted_product.reference(x, x, w).cpu())
    assert torch.equal(total.double().cpu(), column_sum.reference(x, w).cpu())
    assert torch.equal(cross.double().cpu(), weighted_product.reference(x, y, w).cpu())
    assert torch.equal(total_y.double().cpu(), column_sum.reference(y, w).cpu())


def test_zero_weights_add_nothing(device):
    x, _ = _data(37, 33, torch.float32, device, seed=6)
    start = torch.randn(33, 33, device=device)
    out = kernels.weighted_gram(x, torch.zeros(37, device=device), start.clone())
    assert torch.equal(out, start)
    out = kernels.weighted_cross(x, x[:, :9], torch.zeros(37, device=device), start[:, :9].clone())
    assert torch.equal(out, start[:, :9])


def test_strided_views_without_copy(device):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 43, 80, generator=gen).to(device)  # (batch, tokens, wider)
    x = hidden[..., 5:75].reshape(-1, 70)  # rows 80 apart
    assert x.data_ptr() == hidden[..., 5:].data_ptr() and not x.is_contiguous()
    columns = torch.randn(70, 129, generator=gen).to(device).mT  # column stride 129
    w = torch.rand(129, generator=gen).to(device)
    for a in (x, columns):
        want = weighted_product.reference(a, a, w[: a.shape[0]])
        got = kernels.weighted_gram(a, w[: a.shape[0]], torch.zeros(70, 70, device=device))
        _assert_close(got, want, _abs_bound(a, a, w[: a.shape[0]]), 1e-5, "strided gram")
        y = hidden[..., :9].reshape(-1, 9)[: a.shape[0]]
        got = kernels.weighted_cross(a, y, w[: a.shape[0]], torch.zeros(70, 9, device=device))
        _assert_close(
            got, weighted_product.reference(a, y, w[: a.shape[0]]), _abs_bound(a, y, w), 1e-5, "cross"
        )


def test_accumulation_over_several_calls(device):
    x, w = _data(300, 70, torch.float16, device, seed=8)
    gram = torch.randn(70, 70, device=device)
    start = gram.clone()
    total = torch.zeros(70, device=device)
    for lo, hi in ((0, 37), (37, 38), (38, 300)):
        kernels.weighted_gram(x[lo:hi], w[lo:hi], gram, lower_only=True, out_sum=total)
    kernels.mirror_lower(gram)
    want = weighted_product.reference(x, x, w) + start.double().tril() + start.double().tril(-1).mT
    _assert_close(
        gram, want, _abs_bound(x, x, w) + start.abs().double(), 2 * UNIT_ROUNDOFF[torch.float16], "gram"
    )
    _assert_close(total, column_sum.reference(x, w), column_sum.reference(x.abs(), w), 1e-5, "sum")


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [TileConfig(32, 64, 16, 1, num_warps=4, num_stages=1),
                                    TileConfig(64, 32, 32, 3, num_warps=4, num_stages=1)])  # fmt: skip
def test_other_tilings(monkeypatch, config):
    """Non-square tiles (which tiles count as lower) and the plain-store path without split-K."""
    if not kernels.INTERPRETED:
        pytest.skip("the interpreter's tiling")
    monkeypatch.setattr(weighted_product, "INTERPRETER_CONFIG", config)
    x, w = _data(129, 257, torch.float32, torch.device("cpu"), seed=9)
    gram = kernels.weighted_gram(x, w, torch.zeros(257, 257), lower_only=True)
    want = weighted_product.reference(x, x, w)
    lower = torch.ones(257, 257, dtype=torch.bool).tril()
    _assert_close(gram[lower], want[lower], _abs_bound(x, x, w)[lower], 1e-5, "lower triangle")
    kernels.mirror_lower(gram)
    _assert_close(gram, want, _abs_bound(x, x, w), 1e-5, "mirrored gram")


def test_strided_weights(device):
    """Every kernel reads w[i] at w.stride(0) * i: a column of a (n, 2) tensor, a reversed view."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(37, 33, generator=gen).to(device)
    y = torch.randn(37, 9, generator=gen).to(device)
    for w in (torch.rand(37, 2, generator=gen)[:, 0], torch.rand(74, generator=gen)[::2]):
        w = w.to(device)
        assert w.stride(0) == 2
        dense = w.contiguous()
        got = kernels.weighted_sum(x, w, torch.zeros(33, device=device))
        _assert_close(got, column_sum.reference(x, dense), column_sum.reference(x.abs(), dense), 1e-5, "sum")
        got = kernels.weighted_gram(x, w, torch.zeros(33, 33, device=device))
        _assert_close(got, weighted_product.reference(x, x, dense), _abs_bound(x, x, dense), 1e-5, "gram")
        got = kernels.weighted_cross(x, y, w, torch.zeros(33, 9, device=device))
        _assert_close(got, weighted_product.reference(x, y, dense), _abs_bound(x, y, dense), 1e-5, "cross")
        total, energy = torch.zeros(33, device=device), torch.zeros(33, device=device)
        kernels.norm_moments(x, w, total, energy)
        want_sum, want_sq = norm_statistics.reference(x, dense)
        _assert_close(total, want_sum, dense.double().cpu().sum().expand(33) * 8, 1e-5, "sum of z")
        _assert_close(energy, want_sq, want_sq.abs() + dense.double().cpu().sum(), 1e-5, "sum of z^2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 9), (37, 257), (300, 70)])
def test_weighted_sum(device, dtype, n, d):
    x, w = _data(n, d, dtype, device, seed=n + d)
    out = torch.ones(d, device=device)
    kernels.weighted_sum(x, w, out)
    _assert_close(out - 1, column_sum.reference(x, w), column_sum.reference(x.abs(), w) + 1, 1e-5, "sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("n,d", [(1, 9), (37, 33), (129, 257), (300, 128)])
def test_norm_moments(device, dtype, rms, n, d):
    x, w = _data(n, d, dtype, device, seed=2 * n + d)
    x = x * 3 + 2  # an offset and scale that a one-pass variance would feel
    total, energy = torch.zeros(d, device=device), torch.zeros(d, device=device)
    kernels.norm_moments(x, w, total, energy, rms=rms, eps=1e-6)
    want_sum, want_sq = norm_statistics.reference(x, w, rms=rms, eps=1e-6)
    weight = torch.ones(n, dtype=torch.float64) if w is None else w.double().cpu()
    _assert_close(total, want_sum, weight.sum().expand(d) * 8, 1e-5, "sum of z")
    _assert_close(energy, want_sq, want_sq.abs() + weight.sum(), 1e-5, "sum of z^2")


def test_bad_inputs_are_named(device):
    x = torch.randn(10, 9, device=device)
    with pytest.raises(TypeError, match="float64"):
        kernels.weighted_gram(x.double(), None, torch.zeros(9, 9, device=device))
    with pytest.raises(ValueError, match=r"float32 \(9, 9\)"):
        kernels.weighted_gram(x, None, torch.zeros(9, 8, device=device))
    with pytest.raises(ValueError, match="x has 10 rows but y has 3"):
        kernels.weighted_cross(x, x[:3], None, torch.zeros(9, 9, device=device))
    with pytest.raises(ValueError, match=r"w must have shape \(10,\)"):
        kernels.weighted_sum(x, torch.ones(4, device=device), torch.zeros(9, device=device))


@pytest.mark.cuda
def test_int64_offsets_on_gpu():
    if kernels.INTERPRETED or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0")
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    # rows 2^19 apart: the last row starts past 2^31 elements
    hidden = torch.zeros(4200, 2**19, dtype=torch.bfloat16, device="cuda")
    hidden[-3:, :64] = torch.randn(3, 64, device="cuda").bfloat16()
    x = hidden[:, :64]
    gram = kernels.weighted_gram(x, None, torch.zeros(64, 64, device="cuda"))
    want = weighted_product.reference(x[-3:], x[-3:])
    _assert_close(gram, want, _abs_bound(x[-3:], x[-3:], None), 1e-5, "gram past 2^31")


def test_bf16_upcast_only_in_the_interpreter():
    """The interpreter's bf16 dot is wrong (Triton 3.9), so bf16 operands are upcast there;
    compiled kernels keep bf16 on the matrix units. Mixed dtypes are upcast everywhere."""
    from featcal.kernels.launch import dot_options

    assert dot_options(torch.bfloat16, torch.bfloat16)["UPCAST"] == kernels.INTERPRETED
    assert not dot_options(torch.float16, torch.float16)["UPCAST"]
    assert dot_options(torch.bfloat16, torch.float32)["UPCAST"]
    for precision in ("tf32", "tf32x3"):
        want = "ieee" if kernels.INTERPRETED else precision
        assert dot_options(torch.float32, precision=precision)["PRECISION"] == want
        assert dot_options(torch.bfloat16, torch.float32, precision=precision)["PRECISION"] == want
        assert dot_options(torch.float16, precision=precision)["PRECISION"] == "ieee"
    with pytest.raises(ValueError, match="tf32x3"):
        dot_options(torch.float32, precision="fast")
