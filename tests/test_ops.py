"""featcal.ops (pure PyTorch backend) against float64 references, on odd shapes and dtypes."""

import logging

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


def _spd(d, gen, cond=None, dtype=torch.float64, batch=()):
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=torch.float64))
    if cond is None:
        evals = torch.rand(*batch, d, generator=gen, dtype=torch.float64) + 0.5
    else:
        evals = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
        evals = evals.expand(*batch, d)
    return ((q * evals.unsqueeze(-2)) @ q.mT).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_solve_matches_float64(dtype):
    gen = torch.Generator().manual_seed(5)
    A = _spd(50, gen, dtype=dtype)
    B = torch.randn(50, 7, generator=gen, dtype=dtype)
    X = ops.ridge_solve(A, B, ridge=0.3)
    ref = torch.linalg.solve(A.double() + 0.3 * torch.eye(50, dtype=torch.float64), B.double())
    assert X.dtype == dtype
    assert _rel(X, ref) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_ridge_solve_batched_vector_and_noncontiguous():
    gen = torch.Generator().manual_seed(6)
    A = _spd(33, gen, batch=(3,))
    B = torch.randn(3, 11, 33, generator=gen, dtype=torch.float64).mT  # non-contiguous (3, 33, 11)
    assert not B.is_contiguous()
    X = ops.ridge_solve(A, B)
    assert _rel(X, torch.linalg.solve(A, B)) < 1e-12
    b = torch.randn(3, 33, generator=gen, dtype=torch.float64)
    x = ops.ridge_solve(A, b)
    assert x.shape == (3, 33)
    assert _rel(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)) < 1e-12


def test_ridge_solve_ill_conditioned_float64():
    gen = torch.Generator().manual_seed(8)
    A = _spd(40, gen, cond=1e8)
    X_true = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    X = ops.ridge_solve(A, A @ X_true)
    # forward error bounded by cond * eps; check the backward error (residual) tightly
    assert _rel(A @ X, A @ X_true) < 1e-10
    assert _rel(X, X_true) < 1e-6


def test_ridge_solve_singular_retries_with_logged_jitter(caplog):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    A = x.T @ x  # rank 5, PSD
    B = A @ torch.randn(20, 2, generator=gen, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = ops.ridge_solve(A, B)
    assert any("jitter" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(X).all()
    assert _rel(A @ X, B) < 1e-4


def test_ridge_solve_indefinite_falls_back_to_pseudo_inverse(caplog):
    A = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
    B = torch.tensor([[4.0], [3.0], [5.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = ops.ridge_solve(A, B)
    messages = [r.getMessage() for r in caplog.records]
    assert any("jitter" in m for m in messages)
    assert any("pseudo-inverse" in m for m in messages)
    assert torch.allclose(X, torch.linalg.pinv(A) @ B)


def test_ridge_solve_batched_fallback_touches_only_failed_systems(caplog):
    gen = torch.Generator().manual_seed(10)
    good = _spd(6, gen)
    bad = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    A = torch.stack([good, bad, good])
    B = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = ops.ridge_solve(A, B)
    assert any("1 of 3 systems" in r.getMessage() for r in caplog.records)
    assert _rel(X[0], torch.linalg.solve(good, B[0])) < 1e-12
    assert _rel(X[2], torch.linalg.solve(good, B[2])) < 1e-12
    assert _rel(X[1], torch.linalg.pinv(bad) @ B[1]) < 1e-12


def test_ridge_solve_rejects_bad_input():
    with pytest.raises(FeatCalError, match=r"A must be square .* got shape \(3, 4\)"):
        ops.ridge_solve(torch.randn(3, 4), torch.randn(3, 1))
    with pytest.raises(FeatCalError, match=r"B of shape \(4, 2\) does not fit A of shape \(3, 3\)"):
        ops.ridge_solve(torch.eye(3), torch.randn(4, 2))
    with pytest.raises(FeatCalError, match="NaN or Inf"):
        ops.ridge_solve(torch.full((3, 3), float("nan")), torch.randn(3, 1))
    with pytest.raises(FeatCalError, match="floating point"):
        ops.ridge_solve(torch.eye(3, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))


def test_backend_info_and_switch(monkeypatch):
    monkeypatch.delenv("FEATCAL_BACKEND", raising=False)
    info = ops.backend_info()
    assert set(info) == set(ops.OPS)
    assert all(info[op]["cpu"] == "torch" for op in ops.OPS)
    monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    assert ops.backend_info()["ridge_solve"]["cpu"] == "torch"
    monkeypatch.setenv("FEATCAL_BACKEND", "bogus")
    with pytest.raises(FeatCalError, match="FEATCAL_BACKEND='bogus'"):
        ops.backend_info()
