"""Statistics of one task for one transformer block, and the Gram and cross kernels alone.

Block rows: the q/k/v group and the last MLP projection of one block (ViT-B/32: 12,800 tokens
in batches of 16 x 50, d 768 and 3072; Llama-3-8B: 4,096 tokens in batches of 2 x 1,024,
d 4096 and 14336), each ending in G_t and Q_t = C_t W_t^T per module, computed three ways:

    reference   the reference code's formulation: per module (q, k and v each), a weighted copy
                of x_s and of the teacher input, then full matmuls in the activations' dtype
    torch       featcal's accumulator with FEATCAL_BACKEND=torch
    triton      featcal's accumulator with the Triton kernels (CUDA only)

Kernel rows time `weighted_gram` (lower tiles) and `weighted_cross` alone at ViT-B/32 and
Llama-3-8B shapes (float32 with each of the three precisions, with its error against float64),
against torch.matmul and bench/roofline.py's floor. Every row checks its result against the
reference before timing. Useful flops: a Gram counts n d (d + 1) (its distinct entries), a cross
product 2 n dx dy, and the block rows count featcal's formulation, so the reference's
redundant work shows as a lower rate. "% of peak" is
against a plain torch.matmul of the same dtype on the same device, measured in the same run.

    pytest bench/ --benchmark-only            (the summary table prints at the end)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import roofline
import torch
from torch import nn

from featcal import ops
from featcal.errors import Location
from featcal.models.modules import LINEAR, ModuleRef
from featcal.pipeline.plan import BlockPlan, Group, choose_method
from featcal.pipeline.statistics import Accumulator, ExpertCache, TaskSums, normalise, project

ALPHA = 0.25
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class BlockShape:
    name: str
    batches: int
    batch: int
    tokens: int
    attn_in: int
    attn_out: tuple[int, int, int]  # q, k, v widths
    mlp_in: int
    mlp_out: int
    cpu: bool  # small enough to time on a CPU

    @property
    def n(self) -> int:
        return self.batches * self.batch * self.tokens


VIT_B32 = BlockShape("vit-b32", 16, 16, 50, 768, (768, 768, 768), 3072, 768, cpu=True)
LLAMA3_8B = BlockShape("llama3-8b", 2, 2, 1024, 4096, (4096, 1024, 1024), 14336, 4096, cpu=False)


def _device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class _Case:
    """Random activations of one block and one task, and expert Linears with their outputs."""

    def __init__(self, shape: BlockShape, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        dev = _device()
        self.shape, self.dtype = shape, dtype

        def linear(d_in: int, d_out: int) -> nn.Linear:
            layer = nn.Linear(d_in, d_out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
                layer.bias.copy_(0.1 * torch.randn(d_out, generator=gen))
            return layer.to(dev, dtype)

        def states(d: int) -> list[torch.Tensor]:
            size = (shape.batch, shape.tokens, d)
            return [torch.randn(size, generator=gen).to(dev, dtype) for _ in range(shape.batches)]

        self.attn = {name: linear(shape.attn_in, d) for name, d in zip("qkv", shape.attn_out)}
        self.mlp = linear(shape.mlp_in, shape.mlp_out)
        self.xs_attn, self.xs_mlp = states(shape.attn_in), states(shape.mlp_in)
        self.xe_attn = [x + 0.1 * torch.randn(x.shape, generator=gen).to(dev, dtype) for x in self.xs_attn]
        xe_mlp = [x + 0.1 * torch.randn(x.shape, generator=gen).to(dev, dtype) for x in self.xs_mlp]
        with torch.no_grad():
            self.ye_mlp = [self.mlp(x) for x in xe_mlp]
            self.ye_attn = {name: [m(x) for x in self.xe_attn] for name, m in self.attn.items()}
        self.xe_mlp = xe_mlp
        self.modules = {**self.attn, "mlp": self.mlp}
        self._want = None

    def want(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._want is None:
            self._want = self.reference()
        return self._want

    def useful_flops(self) -> float:
        """Flops of featcal's formulation (the cheaper right-hand side per group)."""
        total = 0.0
        n = self.shape.n
        for group in self._groups():
            d, big_d = group.d_in, group.d_out
            total += n * d * (d + 1)
            if choose_method(group, n, ALPHA, "auto") == "cross":
                total += 2 * n * d * d + 2 * d * d * big_d
            else:
                total += 2 * n * d * big_d + 2 * d * d * big_d
        return total

    def fewest_bytes(self) -> int:
        """Every activation read once (student and teacher inputs, expert outputs of project
        groups) and every float32 statistic written once: the roofline's bytes."""
        reads = [*self.xs_attn, *self.xe_attn, *self.xs_mlp, *self.ye_mlp, *self.xe_mlp]
        total = sum(t.numel() * t.element_size() for t in reads)
        for group in self._groups():
            total += 4 * group.d_in * (group.d_in + group.d_out)  # the Gram and Q_t
        return total

    def _groups(self) -> list[Group]:
        attn = [ModuleRef(name, LINEAR, m) for name, m in self.attn.items()]
        return [Group(LINEAR, attn, None), Group(LINEAR, [ModuleRef("mlp", LINEAR, self.mlp)], None)]

    def featcal(self, precision: str = "ieee") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """G_t and Q_t per module through featcal's accumulator and normalisation."""
        groups = self._groups()
        expert = {ref.name: ref for g in groups for ref in g.members}
        sums = TaskSums.zeros(
            BlockPlan(groups, "mlp"), tokens=self.shape.n, alpha=ALPHA, cross_method="auto",
            dtype=torch.float32, device=_device(),
        )  # fmt: skip
        stats = Accumulator(sums, expert, alpha=ALPHA, precision=precision, where=Location(block=0))
        cache = ExpertCache()
        cache.need_inputs, cache.need_outputs = sums.needs()
        for b in range(self.shape.batches):
            cache.inputs["q"], cache.outputs["mlp"] = self.xe_attn[b], self.ye_mlp[b]
            cache.outputs.update({name: ye[b] for name, ye in self.ye_attn.items()})
            stats.begin_batch(None, cache)
            stats.accumulate(0, self.xs_attn[b])
            stats.accumulate(1, self.xs_mlp[b])
            stats.end_batch()
        out = {}
        for moments in (project(m, expert) for m in normalise(sums, expert, alpha=ALPHA, where=stats.where)):
            for k, ref in enumerate(moments.group.members):
                out[ref.name] = (moments.gram, moments.rhs[k])
        _sync()
        return out

    def reference(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The reference's per-module formulation, in the activations' dtype."""
        acc: dict[str, dict] = {}
        for b in range(self.shape.batches):
            for name in self.modules:
                xs, xe = (
                    (self.xs_mlp[b], self.xe_mlp[b]) if name == "mlp" else (self.xs_attn[b], self.xe_attn[b])
                )
                xs, xe = xs.reshape(-1, xs.shape[-1]), xe.reshape(-1, xe.shape[-1])
                w = torch.ones(xs.shape[0], 1, device=xs.device, dtype=xs.dtype)
                xt = ALPHA * xe + (1 - ALPHA) * xs
                update = {"G": xs.T @ (xs * w), "C": xs.T @ (xt * w), "s": (xs * w).sum(0), "n": w.sum()}
                a = acc.setdefault(name, {})
                for key, value in update.items():
                    a[key] = a[key] + value if key in a else value
        out = {}
        for name, a in acc.items():
            weight = self.modules[name].weight
            out[name] = (a["G"] / a["n"], (a["C"] / a["n"]) @ weight.T)
        _sync()
        return out


_cases: dict = {}


def _case(shape: BlockShape, dtype: torch.dtype) -> _Case:
    if (shape, dtype) not in _cases:
        _cases.clear()  # one case in memory at a time
        _cases[(shape, dtype)] = _Case(shape, dtype)
    return _cases[(shape, dtype)]


def _check(got: dict, want: dict, tol: float) -> None:
    for name in want:
        for a, b in zip(got[name], want[name]):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < tol, f"{name}: relative difference {err:.1e}"


def _time(benchmark, fn, rounds: int) -> float:
    """Median seconds of `fn`, run once before (the correctness check) to compile and autotune."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    return benchmark.stats.stats.median


def _tolerance(dtype: torch.dtype, precision: str = "ieee") -> float:
    # the reference multiplies in the activations' dtype; bf16 rounds every product sum to 8 bits
    float32 = {"ieee": 1e-4, "tf32": 3e-3, "tf32x3": 1e-4}[precision]
    return {torch.float32: float32, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


BLOCK_ROWS = [
    pytest.param(shape, dtype, impl, id=f"{shape.name}-{str(dtype)[6:]}-{impl}")
    for shape, dtype in ((VIT_B32, torch.float32), (VIT_B32, torch.bfloat16), (LLAMA3_8B, torch.bfloat16))
    for impl in ("reference", "torch", "triton", "triton-tf32", "triton-tf32x3")
    if not (impl.startswith("triton-") and dtype != torch.float32)
]


@pytest.mark.parametrize("shape,dtype,impl", BLOCK_ROWS)
def test_block_statistics(benchmark, summary, monkeypatch, shape, dtype, impl):
    if not shape.cpu and not CUDA:
        pytest.skip(f"{shape.name} needs a GPU")
    if impl.startswith("triton"):
        _need_compiled_triton()
    if not CUDA and dtype != torch.float32:
        pytest.skip("16-bit models are timed on a GPU only")
    monkeypatch.setenv("FEATCAL_BACKEND", "triton" if impl.startswith("triton") else "torch")
    case = _case(shape, dtype)
    precision = impl.removeprefix("triton-") if impl.startswith("triton-") else "ieee"
    fn = case.reference if impl == "reference" else (lambda: case.featcal(precision=precision))
    _check(fn(), case.want(), _tolerance(dtype, precision))
    seconds = _time(benchmark, fn, rounds=5 if CUDA else 2)
    case_name = f"block {shape.name} {str(dtype)[6:]}"
    summary.add(case_name, impl, seconds, case.useful_flops(), dtype, nbytes=case.fewest_bytes())


BF16, FP32 = torch.bfloat16, torch.float32
KERNEL_ROWS = [
    pytest.param(
        op, n, dx, dy, dtype, precision, impl, id=f"{op}-{n}-{dx}x{dy}-{str(dtype)[6:]}-{precision}-{impl}"
    )
    for op, n, dx, dy, dtype, precisions in (
        ("gram", 12800, 768, 768, BF16, ["ieee"]),  # ViT-B/32: attention input, 256 images
        ("gram", 12800, 3072, 3072, BF16, ["ieee"]),  # ViT-B/32: MLP input
        ("cross", 12800, 3072, 768, BF16, ["ieee"]),
        ("gram", 12800, 768, 768, FP32, ["ieee", "tf32", "tf32x3"]),
        ("gram", 4096, 4096, 4096, BF16, ["ieee"]),  # Llama-3-8B: 2 x 2048 tokens
        ("gram", 4096, 14336, 14336, BF16, ["ieee"]),
        ("cross", 4096, 4096, 4096, BF16, ["ieee"]),
        ("cross", 4096, 14336, 4096, BF16, ["ieee"]),
    )
    for precision in precisions
    for impl in ("torch", "triton")
    if not (impl == "torch" and precision != "ieee")
]


@pytest.mark.parametrize("op,n,dx,dy,dtype,precision,impl", KERNEL_ROWS)
def test_kernel(benchmark, summary, monkeypatch, op, n, dx, dy, dtype, precision, impl):
    """One Gram (lower tiles, then mirrored) or cross product, its relative error against
    float64 and its share of torch.matmul's rate and of the roofline."""
    if not CUDA:
        pytest.skip("the kernels are timed on a GPU (the interpreter is a test tool)")
    if impl == "triton":
        _need_compiled_triton()
    monkeypatch.setenv("FEATCAL_BACKEND", impl)
    gen = torch.Generator().manual_seed(n + dx + dy)
    x = torch.randn(n, dx, generator=gen).cuda().to(dtype)
    y = x if op == "gram" else torch.randn(n, dy, generator=gen).cuda().to(dtype)
    w = torch.rand(n, generator=gen).cuda()
    out = torch.full((dx, dy), float("nan"), device="cuda")

    def run():
        out.zero_()
        if op == "gram":
            ops.complete_gram(ops.weighted_gram(x, w, out, lower_only=True, precision=precision))
        else:
            ops.weighted_cross(x, y, w, out, precision=precision)
        _sync()

    run()
    want = (x.double() * w.double()[:, None]).T @ y.double()
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < (1e-2 if dtype == BF16 or precision == "tf32" else 1e-4), f"relative error {error:.2e}"
    work = roofline.gram_work(n, dx, dtype) if op == "gram" else roofline.cross_work(n, dx, dy, dtype)
    seconds = _time(benchmark, run, rounds=10)
    case = f"{op} n={n} {dx}x{dy} {str(dtype)[6:]} {precision}"
    summary.add(case, impl, seconds, work[0], dtype, nbytes=work[1], precision=precision, error=error)


def _need_compiled_triton() -> None:
    if not CUDA:
        pytest.skip("the Triton kernels are timed on a GPU only (the interpreter is a test tool)")
    from featcal import kernels

    if kernels.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set")
