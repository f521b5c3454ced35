"""The solves of one transformer block: featcal against the reference's per-module solves.

    ViT-B/32     q/k/v 768 with 2304 right-hand sides, out_proj 768 with 768,
                 fc1 768 with 3072, fc2 3072 with 768
    Llama-3-8B   q/k/v 4096 with 6144, o_proj 4096 with 4096, gate/up 4096 with 28672,
                 down 14336 with 4096

Each group's A = G / ||G||_F + (lam + eps) I (lam 0.05, the reference's setting) comes from a
random Gram G. Rows, all float32:

    reference  the reference's method: per module (q, k and v each, gate and up each) the
               matrix A + (lam + eps) I is formed and solved by torch.linalg.solve (LU)
    torch      ops.ridge_solve with FEATCAL_BACKEND=torch: one cholesky_ex + cholesky_solve per
               group of modules sharing an input
    cpp        ops.ridge_solve served by featcal._C: one in-place Cholesky per group

Every row first checks its solutions against float64. Useful flops: d^3 / 3 + 2 d^2 m per
group (featcal's work), so the reference's extra factorisations show as a lower rate.
"Peak extra MB" is the peak memory during one call above the inputs and the solutions it
returns, the scratch space of the solve (CUDA: the caching allocator; CPU: the resident
high-water mark, measured with FEATCAL_BENCH_MEMORY=1); one d x d float32 matrix is 36 MB at
d = 3072, 784 MB at d = 14336. The Llama-3-8B rows run on a GPU, or on the CPU with
FEATCAL_BENCH_LARGE=1 (several minutes).

    pytest bench/test_solves.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

from featcal import extension, ops

CUDA = torch.cuda.is_available()
RIDGE = 0.05 + 1e-8  # lam + eps

# (case, [(d, widths of the modules sharing that input)], timed on a CPU by default)
BLOCKS = {
    "vit-b32": ([(768, (768, 768, 768)), (768, (768,)), (768, (3072,)), (3072, (768,))], True),
    "llama3-8b": (
        [(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,))],
        False,
    ),
}


def _device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _system(d: int, widths: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A normalised Gram of rank d / 2 (plus a small floor) and one right-hand side per module."""
    device = _device()
    x = torch.randn(d, d // 2, generator=gen).to(device)
    G = torch.addmm(torch.eye(d, device=device), x, x.T, beta=1e-3, alpha=2.0 / d)
    G /= torch.linalg.matrix_norm(G)
    return G, [torch.randn(d, m, generator=gen).to(device) for m in widths]


def _reference(groups):
    out = []
    for A, rhs in groups:
        for B in rhs:
            M = A + RIDGE * torch.eye(A.shape[0], device=A.device)
            out.append(torch.linalg.solve(M, B))
    _sync()
    return out


def _featcal(groups):
    out = []
    for A, rhs in groups:
        X = ops.ridge_solve(A, rhs, RIDGE)
        out += list(X.split([B.shape[1] for B in rhs], dim=1))
    _sync()
    return out


def _float64_solutions(groups):
    want = []
    for A, rhs in groups:
        M = A.double() + RIDGE * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
        L = torch.linalg.cholesky(M)
        want += [torch.cholesky_solve(B.double(), L).float() for B in rhs]
    return want


def _check(got, want):
    for X, ref in zip(got, want, strict=True):
        err = ((X - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"relative error {err:.1e} against float64"


def _flops(groups) -> float:
    return sum(A.shape[0] ** 3 / 3 + 2 * A.shape[0] ** 2 * sum(B.shape[1] for B in rhs) for A, rhs in groups)


_blocks: dict[str, tuple[list, list]] = {}


def _block(name: str) -> tuple[list, list]:
    """The block's (A, right-hand sides) per group and their float64 solutions, made once."""
    if name not in _blocks:
        _blocks.clear()
        gen = torch.Generator().manual_seed(0)
        groups = [_system(d, widths, gen) for d, widths in BLOCKS[name][0]]
        _blocks[name] = groups, _float64_solutions(groups)
    return _blocks[name]


@pytest.mark.parametrize("impl", ["reference", "torch", "cpp"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_solves(benchmark, summary, peak_memory, monkeypatch, name, impl):
    if not BLOCKS[name][1] and not CUDA and os.environ.get("FEATCAL_BENCH_LARGE") != "1":
        pytest.skip(f"{name} runs on a GPU, or on the CPU with FEATCAL_BENCH_LARGE=1")
    monkeypatch.setenv("FEATCAL_BACKEND", "torch" if impl == "torch" else "auto")
    if impl == "cpp" and extension.load() is None:
        pytest.fail(f"featcal._C could not be built: {extension.error()}")
    groups, want = _block(name)
    fn = (lambda: _reference(groups)) if impl == "reference" else (lambda: _featcal(groups))
    before = ops.served[("ridge_solve", impl)]
    _check(fn(), want)
    if impl != "reference":
        assert ops.served[("ridge_solve", impl)] == before + len(groups)
    outputs = 4 * sum(B.numel() for _, rhs in groups for B in rhs)
    extra = peak_memory(fn)
    benchmark.pedantic(fn, rounds=5 if BLOCKS[name][1] or CUDA else 1, iterations=1)
    case = f"solves {name} fp32"
    nbytes = sum(
        4 * (A.numel() + 2 * sum(B.numel() for B in rhs)) for A, rhs in groups
    )  # A, B read; X written
    summary.add(
        case,
        impl,
        benchmark.stats.stats.median,
        _flops(groups),
        torch.float32,
        extra and extra - outputs,
        nbytes=nbytes,
    )
