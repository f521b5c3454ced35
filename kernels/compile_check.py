"""Ahead-of-time compile check: every kernel variant, built for GPU targets without a GPU.

    python -m featcal.kernels.compile_check --arch 80,90 [--jobs N] [--json FILE] [--markdown FILE]
    python -m featcal.kernels.compile_check --verify bench/results/compile-check.json [--sample N]

Every variant the launchers can ask for (each kernel file's `compile_variants()`: every dtype,
constexpr combination and tile config) is compiled by `triton.compile` for each target with
the ptxas in Triton's wheel. A row fails on a compile error, on shared memory above the
target's opt-in limit per block, on shared memory above the bound the tuner prunes with, or on
register spills. Configs whose bound exceeds the limit are the tuner's to drop on that target
and are listed as pruned, not compiled. Exit status 1 when any row fails.

Results are cached by a hash of the kernel's source, the variant and the target (`--cache`,
default the user cache): an unchanged kernel is not built again.

`--verify TABLE` is the CI check: the committed table must hold a passing row for every variant
of today's sources (compared by hash, when it was made with this Triton), and a sample of rows
(per kernel and target the one with the most shared memory, and `--sample` drawn at random) is
compiled afresh and must pass, and report what the table says.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # before triton is imported: compile, don't interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import column_sum, norm_statistics, weighted_product  # noqa: E402
from .autotune import SHARED_MEMORY_LIMIT  # noqa: E402
from .launch import INTERPRETED, KernelVariant  # noqa: E402

ARCHS = (80, 90)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Row:
    """One variant on one target: what ptxas reports, and the verdict."""

    kernel: str
    dtype: str
    flags: str
    config: str
    arch: int
    status: str  # "ok", "pruned" or "failed"
    shared: int | None = None
    shared_bound: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    matrix_units: str = ""  # "wgmma", "mma" or "" (no tensor-core instruction)
    seconds: float = 0.0
    problem: str = ""


@functools.cache  # built once per process: every compile job looks its variant up here
def all_variants() -> list[KernelVariant]:
    return [
        *weighted_product.compile_variants(),
        *column_sum.compile_variants(),
        *norm_statistics.compile_variants(),
    ]


def config_label(v: KernelVariant) -> str:
    """128x128x64 split 4 w8 s3 for a tuned config; the block constexprs (N16 D128 w4 s3) otherwise."""
    c = v.constexprs
    if "SPLIT_K" in c:
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} split {c['SPLIT_K']}"
    else:
        tiles = " ".join(
            f"{k.removeprefix('BLOCK_') or 'B'}{v}" for k, v in c.items() if k.startswith("BLOCK")
        )
    return f"{tiles} w{v.num_warps} s{v.num_stages}"


def _source(v: KernelVariant) -> ASTSource:
    signature, constants = {}, dict(v.constexprs)
    for name in v.fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in v.unit:
            signature[name], constants[name] = "constexpr", 1
        elif name in v.pointers:
            signature[name] = "*" + TRITON_TYPES[v.pointers[name]]
        else:
            signature[name] = v.scalars.get(name, "i32")
    aligned = [i for i, name in enumerate(v.fn.arg_names) if name in v.pointers or name in v.divisible]
    return ASTSource(v.fn, signature, constants, {(i,): [["tt.divisibility", 16]] for i in aligned})


def cache_key(v: KernelVariant, arch: int) -> str:
    src = _source(v)
    text = f"{triton.__version__}|{src.hash()}|{arch}|{v.num_warps}|{v.num_stages}|{v.shared_bound}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check(v: KernelVariant, arch: int) -> Row:
    """Compile v for sm_`arch` (unless the tuner prunes it there) and judge what ptxas reports."""
    limit = SHARED_MEMORY_LIMIT[arch]
    base = dict(
        kernel=v.fn.__name__.strip("_"), dtype=v.dtype, flags=v.flags, config=config_label(v), arch=arch
    )
    if v.shared_bound is not None and v.shared_bound > limit:
        return Row(**base, status="pruned", shared_bound=v.shared_bound, problem=f"bound > {limit} B")
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            kernel = triton.compile(
                _source(v),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": v.num_warps, "num_stages": v.num_stages},
            )
    except Exception as err:  # noqa: BLE001 - any compiler error is this row's verdict
        first = str(err).strip().splitlines()
        return Row(
            **base, status="failed", seconds=time.perf_counter() - start, problem=first[0] if first else ""
        )
    seconds = time.perf_counter() - start
    text = log.getvalue()
    registers = _PTXAS_USAGE.search(text)
    spills = _SPILLS.search(text)
    ptx = kernel.asm["ptx"]
    row = Row(
        **base,
        status="ok",
        shared=int(kernel.metadata.shared),
        shared_bound=v.shared_bound,
        registers=int(registers.group(1)) if registers else None,
        spill_stores=int(spills.group(1)) if spills else None,
        spill_loads=int(spills.group(2)) if spills else None,
        matrix_units="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "",
        seconds=round(seconds, 3),
    )
    return _judge(row, limit)


def _judge(row: Row, limit: int) -> Row:
    problems = []
    if row.registers is None or row.spill_stores is None:
        problems.append("no ptxas resource report")
    if row.shared > limit:
        problems.append(f"shared {row.shared} B > limit {limit} B")
    if row.shared_bound is not None and row.shared > row.shared_bound:
        problems.append(f"shared {row.shared} B > the tuner's bound {row.shared_bound} B")
    if row.spill_stores or row.spill_loads:
        problems.append(f"spills {row.spill_stores} B stored, {row.spill_loads} B loaded")
    if not problems:
        return row
    return Row(**{**asdict(row), "status": "failed", "problem": "; ".join(problems)})


def _check_one(job: tuple[int, int]) -> Row:
    index, arch = job
    return check(all_variants()[index], arch)


def run(
    archs: tuple[int, ...], *, jobs: int, cache: Path | None, progress: bool = True
) -> tuple[list[Row], list[str]]:
    """Every variant on every target, in a stable order, with its cache key; cached rows are not
    compiled again."""
    variants = all_variants()
    known: dict[str, dict] = {}
    if cache is not None and cache.exists():
        known = json.loads(cache.read_text())
    keys = {(i, a): cache_key(v, a) for i, v in enumerate(variants) for a in archs}
    todo = [job for job, key in keys.items() if key not in known]
    if progress:
        print(
            f"compile check: {len(keys)} rows, {len(keys) - len(todo)} cached, {len(todo)} to build",
            flush=True,
        )
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for job, row in zip(todo, pool.map(_check_one, todo, chunksize=4)):
                known[keys[job]] = asdict(row)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
    order = sorted(keys, key=lambda j: (j[1], j[0]))
    return [Row(**known[keys[job]]) for job in order], [keys[job] for job in order]


def write_table(path: Path, rows: list[Row], keys: list[str]) -> None:
    lines = [json.dumps({**asdict(r), "key": k}) for r, k in zip(rows, keys)]  # one row a line
    path.write_text(f'{{"triton": "{triton.__version__}", "rows": [\n' + ",\n".join(lines) + "\n]}\n")


def verify(table: Path, *, sample: int, seed: int, jobs: int) -> list[str]:
    """What is wrong with the committed table (see the module docstring); [] when nothing."""
    data = json.loads(table.read_text())
    committed = {row.pop("key"): Row(**row) for row in data["rows"]}
    archs = tuple(sorted({r.arch for r in committed.values()}))
    variants = all_variants()
    jobs_by_key = {cache_key(v, a): (i, a) for i, v in enumerate(variants) for a in archs}
    problems = [
        f"{_name(r)}: {r.status} in the table ({r.problem})"
        for r in committed.values()
        if r.status == "failed"
    ]
    same_triton = data["triton"] == triton.__version__
    if same_triton:
        missing = [k for k in jobs_by_key if k not in committed]
        for key in missing[:5]:
            i, arch = jobs_by_key[key]
            v = variants[i]
            problems.append(
                f"{v.fn.__name__} {v.dtype} {v.flags} {config_label(v)} sm_{arch}: not in the table"
            )
        if missing or len(committed) != len(jobs_by_key):
            problems.append(f"{table} is stale: rerun python -m featcal.kernels.compile_check --json {table}")
            return problems
        picks = _largest_per_kernel(committed) | set(
            random.Random(seed).sample(sorted(committed), min(sample, len(committed)))
        )
    else:
        print(
            f"{table} was made with triton {data['triton']}, this is {triton.__version__}: compiling a sample"
        )
        keys = sorted(jobs_by_key)
        picks = set(random.Random(seed).sample(keys, min(len(keys), sample + 2 * len(archs))))
    todo = sorted(picks)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        fresh = list(pool.map(_check_one, [jobs_by_key[k] for k in todo]))
    for key, row in zip(todo, fresh):
        if row.status == "failed":
            problems.append(f"{_name(row)}: {row.problem}")
        elif same_triton and _measured(row) != _measured(committed[key]):
            problems.append(
                f"{_name(row)}: compiled to {_measured(row)}, the table says {_measured(committed[key])}"
            )
    print(f"verified {len(todo)} rows compiled afresh (seed {seed})")
    return problems


def _name(r: Row) -> str:
    return f"{r.kernel} {r.dtype} {r.flags} {r.config} sm_{r.arch}"


def _measured(r: Row) -> tuple:
    return (r.status, r.shared, r.registers, r.spill_stores, r.spill_loads, r.matrix_units)


def _largest_per_kernel(rows: dict[str, Row]) -> set[str]:
    best: dict[tuple[str, int], str] = {}
    for key, r in rows.items():
        slot = (r.kernel, r.arch)
        if r.status == "ok" and (slot not in best or r.shared > rows[best[slot]].shared):
            best[slot] = key
    return set(best.values())


def markdown(rows: list[Row]) -> str:
    head = "| arch | kernel | dtype | flags | config | status | shared B | bound B | regs | spills | units |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(
            f"| sm_{r.arch} | {r.kernel} | {r.dtype} | {r.flags} | {r.config} | {r.status}"
            f"{f': {r.problem}' if r.problem else ''} | {r.shared or ''} | {r.shared_bound or ''} | "
            f"{r.registers or ''} | {spills} | {r.matrix_units} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> str:
    lines = []
    for arch in sorted({r.arch for r in rows}):
        mine = [r for r in rows if r.arch == arch]
        counts = {s: sum(r.status == s for r in mine) for s in ("ok", "pruned", "failed")}
        top = max((r.shared or 0 for r in mine), default=0)
        lines.append(
            f"sm_{arch}: {counts['ok']} compiled, {counts['pruned']} pruned by the tuner, "
            f"{counts['failed']} failed; most shared memory {top} B of {SHARED_MEMORY_LIMIT[arch]} B; "
            f"most registers {max((r.registers or 0 for r in mine), default=0)}"
        )
    return "\n".join(lines)


def _default_cache() -> Path:
    from featcal.io.user_cache import user_cache_dir

    return user_cache_dir() / "compile-check" / "rows.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featcal.kernels.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--cache", type=Path, default=None, help="row cache (default: featcal's user cache)")
    parser.add_argument("--no-cache", action="store_true", help="compile every row")
    parser.add_argument("--failures-only", action="store_true", help="print only the failed rows")
    parser.add_argument("--verify", type=Path, metavar="TABLE", help="check a committed table (see above)")
    parser.add_argument("--sample", type=int, default=8, help="rows --verify compiles at random (default 8)")
    parser.add_argument("--seed", type=int, help="seed of --verify's sample (default: drawn)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        parser.error("TRITON_INTERPRET=1 is set: unset it, the check compiles the kernels")
    if args.verify:
        if not args.verify.is_file():
            parser.error(f"--verify: no table at {args.verify}")
        seed = random.SystemRandom().randrange(2**31) if args.seed is None else args.seed
        problems = verify(args.verify, sample=args.sample, seed=seed, jobs=max(1, args.jobs))
        for line in problems:
            print(f"compile check: {line}")
        print(
            "compile check: the table holds" if not problems else f"compile check: {len(problems)} problems"
        )
        return 1 if problems else 0
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch takes compute capabilities such as 80,90, got {args.arch!r}")
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(
            f"no shared-memory limit known for sm_{unknown[0]} (known: {sorted(SHARED_MEMORY_LIMIT)})"
        )
    cache = None if args.no_cache else (args.cache or _default_cache())
    start = time.perf_counter()
    rows, keys = run(archs, jobs=max(1, args.jobs), cache=cache)
    shown = [r for r in rows if r.status == "failed"] if args.failures_only else rows
    print(markdown(shown), end="")
    print(summary(rows))
    print(f"{time.perf_counter() - start:.1f} s, triton {triton.__version__}")
    if args.json:
        write_table(args.json, rows, keys)
    if args.markdown:
        command = "python -m featcal.kernels.compile_check --arch " + ",".join(map(str, archs))
        lines = [f"# Compile check, triton {triton.__version__}", f"`{command}`", *summary(rows).splitlines()]
        args.markdown.write_text("\n\n".join(lines) + "\n\n" + markdown(rows))
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
