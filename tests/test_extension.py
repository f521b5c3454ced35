"""featcal._C: its build and fallback, its own input checks, the ATen (CUDA) path on the CPU,
and a whole calibration served by it."""

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import CLIP_VISION, features, setup

from featcal import FeatCalConfig, calibrate, extension, ops


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _spd(d, gen, batch=(), dtype=torch.float64):
    x = torch.randn(*batch, d + 7, d, generator=gen, dtype=torch.float64)
    return (x.mT @ x / d).to(dtype)


def test_backend_info_names_the_cpp_path(cpp):
    info = ops.backend_info()
    assert info["ridge_solve"] == {"cpu": "cpp", "cuda": "cpp"}
    assert info["assemble"]["cpu"] == "cpp"
    assert sys.modules["featcal._C"] is cpp


@pytest.mark.parametrize("fn", ["ridge_solve", "ridge_solve_aten"])
def test_solutions_come_back_as_contiguous_transposes(cpp, fn):
    gen = torch.Generator().manual_seed(0)
    A, B = _spd(40, gen, dtype=torch.float32), torch.randn(40, 9, generator=gen)
    X, steps = getattr(cpp, fn)(A, [B], 0.5, list(ops.JITTER_STEPS))
    assert X.shape == (40, 9) and X.mT.is_contiguous()  # W* = X^T needs no copy
    assert steps.tolist() == [0]
    assert (
        _rel(X, torch.linalg.solve(A.double() + 0.5 * torch.eye(40, dtype=torch.float64), B.double())) < 1e-5
    )


@pytest.mark.parametrize("d", [24, 600])  # batched factorisation, then one system at a time
def test_aten_path_matches_lapack_path(cpp, d):
    gen = torch.Generator().manual_seed(d)
    A = _spd(d, gen, batch=(3,))
    A[1] = -A[1]  # fails every jitter step: pseudo-inverse
    B = torch.randn(3, d, 5, generator=gen, dtype=torch.float64)
    jitter = list(ops.JITTER_STEPS)
    X, steps = cpp.ridge_solve_aten(A, [B], 0.0, jitter)
    Y, lapack_steps = cpp.ridge_solve(A, [B], 0.0, jitter)
    assert steps.tolist() == lapack_steps.tolist() == [0, len(jitter) + 1, 0]
    for i in (0, 2):
        assert _rel(X[i], torch.linalg.solve(A[i], B[i])) < 1e-10
    assert _rel(X[1], torch.linalg.pinv(A[1]) @ B[1]) < 1e-10
    assert _rel(X, Y) < 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("d,batch", [(64, 32), (1000, 2)])  # batched potrf; one system at a time
def test_cuda_solves_and_assemble_match_float64(cpp, d, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(d)
    A = _spd(d, gen, batch=(batch,), dtype=torch.float32)
    A[1] = -A[1]  # the pseudo-inverse path
    B = torch.randn(batch, d, 7, generator=gen)
    A_cuda, parts = A.cuda(), [B[..., :3].cuda(), B[..., 3:].cuda()]
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    X = ops.ridge_solve(A_cuda, parts, 0.1)
    scratch = torch.cuda.max_memory_allocated() - before - B.numel() * 4  # beyond X itself
    chunk = batch if d <= 512 else 1
    # the factor workspace, and for the pseudo-inverse system eigh's copy, eigenvectors and
    # cuSOLVER workspace (about d^2 each) and the product with the right-hand sides
    assert scratch <= 1.1 * (chunk + 4) * d * d * 4 + 2**20
    M = A.double() + 0.1 * torch.eye(d, dtype=torch.float64)
    for i in range(batch):
        want = torch.linalg.pinv(M[i]) @ B[i].double() if i == 1 else torch.linalg.solve(M[i], B[i].double())
        assert _rel(X[i].cpu(), want) < 1e-3
    acc, G = torch.zeros(d, d, device="cuda"), torch.randn(d, d, generator=gen)
    n = ops.assemble(acc, G.cuda(), 1e-8)
    assert n == pytest.approx(G.double().norm().item(), rel=1e-5)
    assert torch.allclose(acc.cpu(), G / n, atol=1e-7)


def test_jitter_step_is_reported_per_system(cpp):
    A = torch.diag(torch.tensor([1.0, 1.0, -1e-7], dtype=torch.float64))  # fixed by jitter 1e-6
    B = torch.ones(3, 1, dtype=torch.float64)
    for fn in (cpp.ridge_solve, cpp.ridge_solve_aten):
        _, steps = fn(A, [B], 0.0, [1e-10, 1e-8, 1e-6])
        assert steps.tolist() == [3]


def test_cpp_checks_name_the_fault(cpp):
    with pytest.raises(RuntimeError, match=r"A must be square \(\.\.\., d, d\), got shape \[3, 4\]"):
        cpp.ridge_solve(torch.randn(3, 4), [torch.randn(3, 1)], 0.0, [])
    with pytest.raises(RuntimeError, match=r"B of shape \[2, 4, 1\] does not fit A of shape \[3, 4, 4\]"):
        cpp.ridge_solve(torch.randn(3, 4, 4), [torch.randn(3, 4, 1), torch.randn(2, 4, 1)], 0.0, [])
    with pytest.raises(RuntimeError, match="A must be floating point, got Long"):
        cpp.ridge_solve(torch.eye(3, dtype=torch.long), [torch.randn(3, 1)], 0.0, [])
    with pytest.raises(RuntimeError, match="B must be floating point, got Int"):
        cpp.ridge_solve(torch.eye(3), [torch.ones(3, 1, dtype=torch.int)], 0.0, [])
    with pytest.raises(RuntimeError, match=r"A of shape \[3, 3\] contains NaN or Inf"):
        cpp.ridge_solve_aten(torch.full((3, 3), float("inf")), [torch.randn(3, 1)], 0.0, [])
    with pytest.raises(RuntimeError, match="no right-hand side given"):
        cpp.ridge_solve(torch.eye(3), [], 0.0, [])
    with pytest.raises(RuntimeError, match="assemble: A is Double but G is Float"):
        cpp.assemble(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2), 0.0)
    with pytest.raises(RuntimeError, match="assemble: A and G must be float32 or float64, got Half"):
        cpp.assemble(torch.zeros(2, 2, dtype=torch.half), torch.zeros(2, 2, dtype=torch.half), 0.0)


@pytest.mark.parametrize("d", [30, 2100])  # 2100^2 elements: the norm is summed in two bands
def test_assemble_on_noncontiguous_views(cpp, d):
    gen = torch.Generator().manual_seed(4)
    A, G = torch.zeros(d, d), torch.randn(d, d, generator=gen)
    n = cpp.assemble(A.mT, G.mT, 0.0)
    assert n == pytest.approx(G.double().norm().item(), rel=1e-12)
    assert torch.allclose(A, G / n)


def test_a_built_extension_loads_without_the_compiling_notice(cpp, caplog):
    with caplog.at_level(logging.INFO, logger="featcal"):
        extension._build()
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]


def test_failed_build_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("Error building extension 'featcal_C'\ncompiler output ...")

    monkeypatch.setenv("FEATCAL_BACKEND", "auto")
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_error", None)
    monkeypatch.setattr(extension, "_build", no_compiler)
    before = ops.served[("ridge_solve", "torch")]
    with caplog.at_level(logging.WARNING, logger="featcal"):
        X = ops.ridge_solve(2 * torch.eye(3), torch.ones(3, 2))
        assert ops.backend_info()["ridge_solve"]["cpu"] == "torch"
    assert torch.allclose(X, torch.full((3, 2), 0.5))
    assert ops.served[("ridge_solve", "torch")] == before + 1
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "C++ extension unavailable (RuntimeError: Error building extension 'featcal_C'); "
        "PyTorch serves ridge_solve"
    ]
    assert extension.error().startswith("RuntimeError: Error building extension")


def test_import_does_not_build_and_no_compiler_still_runs(tmp_path):
    code = (
        "import sys, featcal, torch\n"
        "from featcal import ops\n"
        "assert 'featcal._C' not in sys.modules\n"
        "print(ops.backend_info()['ridge_solve']['cpu'])\n"
        "print(ops.ridge_solve(2 * torch.eye(2), torch.ones(2)).tolist())\n"
    )
    env = dict(
        os.environ, FEATCAL_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"), FEATCAL_BACKEND="auto"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["torch", "[0.5, 0.5]"]
    assert "C++ extension unavailable" in run.stderr and "PyTorch serves ridge_solve" in run.stderr


def test_calibrate_with_cpp_equals_torch(cpp, monkeypatch):
    base, experts, merged, data = setup(CLIP_VISION, dtype=torch.float32)
    cfg = FeatCalConfig(progress=False)
    models = {}
    for backend, impl in (("torch", "torch"), ("auto", "cpp")):
        monkeypatch.setenv("FEATCAL_BACKEND", backend)
        before = ops.served[("ridge_solve", impl)]
        models[impl], _ = calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg)
        # one solve per linear group: q/k/v together, out_proj, fc1, fc2; in the last block q
        # weighs the class token apart from k/v (the reference's focus), so it has its own
        assert ops.served[("ridge_solve", impl)] - before == 4 * merged.config.num_hidden_layers + 1
    for (name, got), want in zip(models["cpp"].named_parameters(), models["torch"].parameters()):
        assert _rel(got, want) < 1e-5, name
    batches = [CLIP_VISION.make_batch(torch.Generator().manual_seed(5), 3)]
    got, want = features(CLIP_VISION, models["cpp"], batches), features(CLIP_VISION, models["torch"], batches)
    assert _rel(got, want) < 1e-5
    moved = features(CLIP_VISION, merged, batches)
    assert _rel(want, moved) > 1e-4  # calibration did something


def test_cli_backends_reports_the_cpp_path(cpp, capsys):
    from featcal.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["ridge_solve", "cpu:", "cpp"] for line in out)
    assert out[-1] == f"featcal._C: {cpp.__file__}"
