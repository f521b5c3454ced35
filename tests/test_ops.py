"""featcal.ops statistics (pure PyTorch backend) against float64 references, on odd shapes and dtypes."""

import pytest
import torch

from featcal import ops
from featcal.errors import FeatCalError

SHAPES = [(1, 9), (37, 33), (129, 70), (300, 257), (64, 600)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


def _weights(n, gen, zeros=True):
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    if zeros:
        w[::3] = 0
    return w


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_gram_matches_float64(n, d, dtype, weighted):
    gen = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=gen).to(dtype)
    w = _weights(n, gen) if weighted else None
    x64 = x.double()
    out = ops.weighted_gram(x, None if w is None else w.to(dtype))
    assert out.dtype == ops.accumulator_dtype(dtype)
    w_cast = None if w is None else w.to(dtype).double()
    ref = x64.T @ (x64 if w_cast is None else x64 * w_cast[:, None])
    assert _rel(out, ref) < _tol(dtype)


@pytest.mark.parametrize("d", [9, 70, 257, 600, 1030])
def test_lower_only_gram_completes_to_full(d, monkeypatch):
    if d < 500:
        monkeypatch.setattr(ops, "GRAM_TILE", 4)  # exercise the tiles on small matrices too
    gen = torch.Generator().manual_seed(d)
    tile = ops.GRAM_TILE
    out = torch.zeros(d, d)
    for row in range(0, d, tile):  # poison the tiles lower_only must not touch
        out[row : row + tile, row + tile :] = float("nan")
    xs = [torch.randn(n, d, generator=gen) for n in (5, 37, 1)]
    ws = [torch.rand(x.shape[0], generator=gen) for x in xs]
    for x, w in zip(xs, ws):
        ops.weighted_gram(x, w, out, lower_only=True)
    ops.complete_gram(out)
    ref = sum(x.double().T @ (x.double() * w.double()[:, None]) for x, w in zip(xs, ws))
    assert _rel(out, ref) < 2e-6


def test_accumulates_over_calls_and_keeps_float64():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(20, 7, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    out = ops.weighted_gram(x1)
    ops.weighted_gram(x2, out=out)
    assert out.dtype == torch.float64
    assert _rel(out, x1.T @ x1 + x2.T @ x2) < 1e-13


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_cross_and_sum_match_float64(n, d, dtype):
    gen = torch.Generator().manual_seed(7 * n + d)
    x = torch.randn(n, d, generator=gen).to(dtype)
    y = torch.randn(n, d // 2 + 3, generator=gen).to(dtype)
    w = _weights(n, gen).to(dtype)
    x64, y64, w64 = x.double(), y.double(), w.double()
    assert _rel(ops.weighted_cross(x, y, w), x64.T @ (y64 * w64[:, None])) < _tol(dtype)
    assert _rel(ops.weighted_cross(x, y), x64.T @ y64) < _tol(dtype)
    assert _rel(ops.weighted_sum(x, w), w64 @ x64) < _tol(dtype)
    assert _rel(ops.weighted_sum(x), x64.sum(0)) < _tol(dtype)


def test_strided_views_are_read_without_assumptions():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(50, 4, 90, generator=gen)
    x = big[:, 1, ::2]  # (50, 45), row stride 360, column stride 2
    y = big[:, 2, 5:40]
    w = torch.rand(50, generator=gen)
    xc, yc = x.contiguous().double(), y.contiguous().double()
    assert _rel(ops.weighted_gram(x, w), xc.T @ (xc * w.double()[:, None])) < 2e-6
    assert _rel(ops.weighted_cross(x, y, w), xc.T @ (yc * w.double()[:, None])) < 2e-6


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_moments(rms, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(129, 33, generator=gen) + 1).to(dtype)
    w = _weights(129, gen)
    x64 = x.double()
    if rms:
        z = x64 / (x64.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    else:
        mu = x64.mean(-1, keepdim=True)
        z = (x64 - mu) / ((x64 - mu).square().mean(-1, keepdim=True) + 1e-6).sqrt()
    s, sq = ops.norm_moments(x, w.to(dtype), rms=rms, eps=1e-6)
    w64 = w.to(dtype).double()
    assert _rel(s, w64 @ z) < _tol(dtype) * 10
    assert _rel(sq, w64 @ z.square()) < _tol(dtype) * 10


def test_bad_inputs_are_named():
    with pytest.raises(FeatCalError, match=r"x must have shape \(n, d\)"):
        ops.weighted_gram(torch.randn(2, 3, 4))
    with pytest.raises(FeatCalError, match="x has 4 rows but y has 5"):
        ops.weighted_cross(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(FeatCalError, match=r"w must have shape \(4,\)"):
        ops.weighted_gram(torch.randn(4, 3), torch.ones(5))
    with pytest.raises(FeatCalError, match=r"out has shape \(2, 2\), expected \(3, 3\)"):
        ops.weighted_gram(torch.randn(4, 3), out=torch.zeros(2, 2))
    with pytest.raises(FeatCalError, match="floating point"):
        ops.weighted_sum(torch.ones(4, 3, dtype=torch.long))


def test_backend_info_and_switch(monkeypatch):
    monkeypatch.delenv("FEATCAL_BACKEND", raising=False)
    info = ops.backend_info()
    assert set(info) == set(ops.OPS)
    assert all(info[op]["cpu"] == "torch" for op in ops.STATISTICS_OPS)
    monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    assert all(info["cpu"] == "torch" for info in ops.backend_info().values())
    monkeypatch.setenv("FEATCAL_BACKEND", "bogus")
    with pytest.raises(FeatCalError, match="FEATCAL_BACKEND='bogus'"):
        ops.backend_info()
