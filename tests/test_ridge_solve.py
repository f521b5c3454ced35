"""ops.ridge_solve and ops.assemble, served by PyTorch and by featcal._C, against float64."""

import logging

import pytest
import torch

from featcal import ops
from featcal.errors import FeatCalError


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _spd(d, gen, cond=None, dtype=torch.float64, batch=()):
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=torch.float64))
    if cond is None:
        evals = torch.rand(*batch, d, generator=gen, dtype=torch.float64) + 0.5
    else:
        evals = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
        evals = evals.expand(*batch, d)
    return ((q * evals.unsqueeze(-2)) @ q.mT).to(dtype)


def _solve(solver, *args, **kwargs):
    """ops.ridge_solve, checking that `solver` really served it."""
    before = ops.served[("ridge_solve", solver)]
    X = ops.ridge_solve(*args, **kwargs)
    assert ops.served[("ridge_solve", solver)] == before + 1
    return X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,m", [(50, 7), (301, 613)])
def test_matches_float64(solver, dtype, d, m):
    gen = torch.Generator().manual_seed(d)
    A = _spd(d, gen, cond=1e3, dtype=dtype)
    B = torch.randn(d, m, generator=gen, dtype=dtype)
    X = _solve(solver, A, B, ridge=0.3)
    A64 = A.double() + 0.3 * torch.eye(d, dtype=torch.float64)
    ref = torch.linalg.solve(A64, B.double())
    assert X.dtype == dtype and X.shape == (d, m)
    if dtype == torch.float64:
        assert _rel(X, ref) < 1e-12
    else:  # at most twice the error of PyTorch's own float32 LU solve
        lu = torch.linalg.solve(A + 0.3 * torch.eye(d), B)
        assert _rel(X, ref) < max(2 * _rel(lu, ref), 1e-6)


def test_mixed_dtypes_solve_in_float64(solver):
    gen = torch.Generator().manual_seed(1)
    A = _spd(20, gen, dtype=torch.float32)
    B = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    X = _solve(solver, A, B)
    assert X.dtype == torch.float64
    assert _rel(X, torch.linalg.solve(A.double(), B)) < 1e-12


def test_batched_vector_and_noncontiguous(solver):
    gen = torch.Generator().manual_seed(6)
    A = _spd(33, gen, batch=(2, 3))
    B = torch.randn(2, 3, 11, 33, generator=gen, dtype=torch.float64).mT  # non-contiguous (2, 3, 33, 11)
    assert not B.is_contiguous()
    X = _solve(solver, A, B)
    assert X.shape == (2, 3, 33, 11)
    assert _rel(X, torch.linalg.solve(A, B)) < 1e-12
    b = torch.randn(2, 3, 33, generator=gen, dtype=torch.float64)
    x = _solve(solver, A.mT, b)  # a transposed (still symmetric) A
    assert x.shape == (2, 3, 33)
    assert _rel(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)) < 1e-12


def test_right_hand_sides_side_by_side(solver):
    gen = torch.Generator().manual_seed(7)
    A = _spd(29, gen, batch=(2,), dtype=torch.float32)
    parts = [torch.randn(2, 29, m, generator=gen) for m in (5, 1, 12)]
    parts[1] = parts[1].double()  # any float64 part makes the solve float64
    X = _solve(solver, A, parts, ridge=0.2)
    assert X.shape == (2, 29, 18) and X.dtype == torch.float64
    M = A.double() + 0.2 * torch.eye(29, dtype=torch.float64)
    assert _rel(X, torch.linalg.solve(M, torch.cat([p.double() for p in parts], -1))) < 1e-6
    with pytest.raises(FeatCalError, match=r"B of shape \(2, 28, 1\) does not fit A of shape \(2, 29, 29\)"):
        ops.ridge_solve(A, [parts[0], torch.randn(2, 28, 1)])
    with pytest.raises(FeatCalError, match="no right-hand side"):
        ops.ridge_solve(A, [])


def test_inputs_are_not_modified(solver):
    gen = torch.Generator().manual_seed(2)
    A, B = _spd(17, gen, dtype=torch.float32), torch.randn(17, 4, generator=gen)
    A0, B0 = A.clone(), B.clone()
    _solve(solver, A, B, ridge=0.1)
    assert torch.equal(A, A0) and torch.equal(B, B0)


def test_ill_conditioned_float64(solver):
    gen = torch.Generator().manual_seed(8)
    A = _spd(40, gen, cond=1e8)
    X_true = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    X = _solve(solver, A, A @ X_true)
    # forward error bounded by cond * eps; the backward error (residual) is tight
    assert _rel(A @ X, A @ X_true) < 1e-10
    assert _rel(X, X_true) < 1e-6


def test_ill_conditioned_float32_backward_error(solver):
    gen = torch.Generator().manual_seed(12)
    A = _spd(64, gen, cond=1e8, dtype=torch.float32)
    B = torch.randn(64, 5, generator=gen)
    X = _solve(solver, A, B)
    assert torch.isfinite(X).all()
    residual = (A.double() @ X.double() - B.double()).norm()
    assert (residual / (A.double().norm() * X.double().norm())).item() < 1e-5


def test_singular_retries_with_logged_jitter(solver, caplog):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    A = x.T @ x  # rank 5, PSD
    B = A @ torch.randn(20, 2, generator=gen, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = _solve(solver, A, B)
    assert any("jitter 1e-10 x mean diagonal" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(X).all()
    assert _rel(A @ X, B) < 1e-4


def test_indefinite_falls_back_to_pseudo_inverse(solver, caplog):
    A = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
    B = torch.tensor([[4.0], [3.0], [5.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = _solve(solver, A, B)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retried with diagonal jitter" in m for m in messages) == len(ops.JITTER_STEPS)
    assert any("pseudo-inverse" in m for m in messages)
    assert torch.allclose(X, torch.linalg.pinv(A) @ B)


def test_batched_fallback_touches_only_failed_systems(solver, caplog):
    gen = torch.Generator().manual_seed(10)
    good = _spd(6, gen)
    bad = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    A = torch.stack([good, bad, good])
    B = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = _solve(solver, A, B)
    assert any("1 of 3 systems" in r.getMessage() for r in caplog.records)
    assert _rel(X[0], torch.linalg.solve(good, B[0])) < 1e-12
    assert _rel(X[2], torch.linalg.solve(good, B[2])) < 1e-12
    assert _rel(X[1], torch.linalg.pinv(bad) @ B[1]) < 1e-12


def test_rejects_bad_input(solver):
    with pytest.raises(FeatCalError, match=r"A must be square .* got shape \(3, 4\)"):
        ops.ridge_solve(torch.randn(3, 4), torch.randn(3, 1))
    with pytest.raises(FeatCalError, match=r"B of shape \(4, 2\) does not fit A of shape \(3, 3\)"):
        ops.ridge_solve(torch.eye(3), torch.randn(4, 2))
    with pytest.raises(FeatCalError, match=r"B of shape \(2, 3, 1\) does not fit A of shape \(3, 3, 3\)"):
        ops.ridge_solve(torch.eye(3).expand(3, 3, 3), torch.randn(2, 3, 1))
    with pytest.raises(FeatCalError, match="NaN or Inf"):
        ops.ridge_solve(torch.full((3, 3), float("nan")), torch.randn(3, 1))
    with pytest.raises(FeatCalError, match="floating point"):
        ops.ridge_solve(torch.eye(3, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assemble_folds_normalised_grams(solver, dtype):
    gen = torch.Generator().manual_seed(3)
    A = torch.zeros(129, 129, dtype=dtype)
    want = torch.zeros(129, 129, dtype=torch.float64)
    for scale in (1.0, 1e3, 1e-3):
        G = (scale * torch.randn(129, 129, generator=gen, dtype=torch.float64)).to(dtype)
        norm = G.double().norm().item()
        before = ops.served[("assemble", solver)]
        assert ops.assemble(A, G, 1e-8) == pytest.approx(norm, rel=1e-12)
        assert ops.served[("assemble", solver)] == before + 1
        want += G.double() / norm
    assert _rel(A, want) < (1e-14 if dtype == torch.float64 else 1e-6)


def test_assemble_eps_floor_and_zero(solver):
    A = torch.ones(4, 4)
    assert ops.assemble(A, torch.full((4, 4), 1e-6), 1.0) == 1.0
    assert torch.allclose(A, torch.full((4, 4), 1 + 1e-6))
    assert ops.assemble(A, torch.zeros(4, 4), 0.0) == 0.0
    assert torch.allclose(A, torch.full((4, 4), 1 + 1e-6))
    with pytest.raises(FeatCalError, match=r"assemble: A \(4, 4\) torch.float32 and G \(3, 3\)"):
        ops.assemble(A, torch.zeros(3, 3), 0.0)
