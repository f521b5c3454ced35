"""The prepared GPU run: every GPU check and benchmark of featcal, in one call on a fresh machine.

    bash bench/gpu/run.sh [--out DIR] [--only STEP,...] [--budget SECONDS] [--reference SRC]
    bash bench/gpu/run.sh --dry-run        (any machine: the steps, their limits, the estimate)

From the repository root it makes this checkout importable as featcal (a folder of links on
PYTHONPATH: nothing is installed or downloaded, the machine's own torch, triton and
transformers serve), builds featcal._C, runs the CUDA tests with compiled
Triton kernels, the kernel and block-statistics benchmarks (ViT-B/32 and Llama-3-8B shapes,
against torch.matmul, with the roofline of bench/roofline.py), the solve benchmark, the B32-TA8
CLIP end to end (8 experts, 256 images each; against the published reference when `--reference`
names its src/ folder) and the Llama-3-8B-block streamed run. Each step has its own time limit
and the whole run a budget (default 540 s); a step is skipped when the budget left is below its
estimate. Results go to DIR (default bench/results/<gpu>/) as they are made: one log per step,
the benchmarks' JSON, and run.json, rewritten after every step (device, torch, CUDA, Triton,
commit; per step its command, exit status and seconds), so a run cut short keeps what it
finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]  # "{out}" is replaced by the results directory
    limit: int  # seconds, after which the step is killed
    estimate: int  # seconds it is expected to take on an H100
    env: dict[str, str] = field(default_factory=dict)


def _bench(name: str, *args: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "--benchmark-only",
            f"--benchmark-json={{out}}/{name}.json"]  # fmt: skip


COMPILED = {"TRITON_INTERPRET": "0", "FEATCAL_REQUIRE_EXTENSION": "1"}
EXTENSION = "from featcal import extension; assert extension.load(), extension.error()"
KERNELS = "bench/test_statistics_kernels.py"
LLAMA = ["--blocks", "2", "--experts", "2", "--sequences", "32", "--json", "{out}/llama3-8b-streamed.json"]
MOE = ["--device", "cuda", "--dtype", "bfloat16", "--repeats", "2", "--json", "{out}/moe-block.json"]
CLIP = ["--tasks", "8", "--images", "256", "--device", "cuda", "--json", "{out}/clip-b32-ta8.json"]
STEPS = [
    Step("extension", [PY, "-c", EXTENSION], 90, 45),
    Step("cuda-tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"], 120, 60,
         COMPILED),
    Step("kernels", _bench("kernels", KERNELS, "-k", "test_kernel"), 90, 50, COMPILED),
    Step("block-statistics", _bench("block-statistics", KERNELS, "-k", "block"), 45, 25, COMPILED),
    Step("solves", _bench("solves", "bench/test_solves.py"), 30, 15, COMPILED),
    Step("clip-b32-ta8", [PY, "bench/e2e_clip_b32.py", *CLIP], 45, 25, COMPILED),
    Step("llama3-8b-block", [PY, "bench/e2e_llama8b_gpu.py", *LLAMA], 50, 35, COMPILED),
    Step("moe-block", [PY, "bench/e2e_moe_block.py", *MOE], 60, 30, COMPILED),
]  # fmt: skip
BUDGET = 540


@dataclass
class Outcome:
    name: str
    command: str
    status: str  # "passed", "failed", "timed out", "skipped"
    seconds: float = 0.0
    returncode: int | None = None
    tail: str = ""


def _capture(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    """Device, versions and commit, read without initialising anything the steps need."""
    probe = (
        "import json, torch, triton; print(json.dumps({'torch': torch.__version__, "
        "'cuda': torch.version.cuda, 'triton': triton.__version__, "
        "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"
    )
    versions = json.loads(_capture(PY, "-c", probe) or "{}")
    return {
        **versions,
        "python": sys.version.split()[0],
        "commit": _capture("git", "rev-parse", "HEAD"),
        "dirty": bool(_capture("git", "status", "--porcelain", "--untracked-files=no")),
        "nvidia_smi": _capture(
            "nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"
        ),
    }


def slug(device: str | None) -> str:
    """bench/results/ folder name for a device, e.g. 'NVIDIA H200' -> 'h200'."""
    if not device:
        return "no-gpu"
    name = re.sub(r"^nvidia\s+", "", device.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def link_package(into: Path) -> Path:
    """A mirror of this checkout under `into`, all links, where `featcal` is laid out as installed
    (featcal/* with kernels/ as featcal.kernels and csrc/ as featcal.csrc). Steps run there, with
    it on PYTHONPATH: `python -m` and `-c` put the working directory first on sys.path."""
    into.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in ("featcal", ".git"):
            (into / entry.name).symlink_to(entry)
    package = into / "featcal"
    package.mkdir()
    for entry in (ROOT / "featcal").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")
    (package / "csrc").symlink_to(ROOT / "csrc")
    return into


def select(only: str | None) -> list[Step]:
    if not only:
        return STEPS
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in STEPS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown step {unknown[0]!r}; the steps: {', '.join(sorted(known))}")
    return [s for s in STEPS if s.name in names]


def plan(steps: list[Step], budget: int) -> str:
    lines = [f"{'step':<18} {'limit s':>8} {'estimate s':>11}  command"]
    for s in steps:
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        lines.append(
            f"{s.name:<18} {s.limit:>8} {s.estimate:>11}  {env + ' ' if env else ''}{' '.join(s.command)}"
        )
    total_limit = sum(s.limit for s in steps)
    total_estimate = sum(s.estimate for s in steps)
    lines.append(f"{'total':<18} {total_limit:>8} {total_estimate:>11}  (budget {budget} s)")
    return "\n".join(lines)


def run_step(step: Step, out: Path, root: Path = ROOT) -> Outcome:
    """Run one step from `root` (with `root` first on PYTHONPATH) under its time limit."""
    command = [part.replace("{out}", str(out)) for part in step.command]
    log = out / f"{step.name}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        environ = {**os.environ, "PYTHONPATH": path, **step.env}
        proc = subprocess.Popen(command, cwd=root, stdout=handle, stderr=subprocess.STDOUT,
                                env=environ, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=step.limit)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = None, "timed out"
    seconds = round(time.perf_counter() - start, 1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return Outcome(step.name, " ".join(command), status, seconds, rc, tail)


def _run_in_budget(step: Step, out: Path, mirror: Path, deadline: float) -> Outcome:
    """The step under the smaller of its limit and the budget left; skipped when the budget left
    is below its estimate."""
    left = deadline - time.monotonic()
    if left < step.estimate:
        return Outcome(step.name, " ".join(step.command), "skipped", tail=f"{left:.0f} s of budget left")
    return run_step(
        Step(step.name, step.command, min(step.limit, int(left)), step.estimate, step.env), out, mirror
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the steps, their limits and the estimate"
    )
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<gpu>/)")
    parser.add_argument("--only", help="comma-separated steps to run")
    parser.add_argument(
        "--budget", type=int, default=BUDGET, help=f"seconds for the whole run (default {BUDGET})"
    )
    parser.add_argument("--reference", help="src/ folder of the published FeatCal code, for the CLIP step")
    args = parser.parse_args(argv)
    steps = select(args.only)
    if args.reference:
        steps = [
            Step(s.name, [*s.command, "--reference", args.reference], s.limit, s.estimate, s.env)
            if s.name == "clip-b32-ta8"
            else s
            for s in steps
        ]
    print(plan(steps, args.budget))
    if args.dry_run:
        return 0
    env = environment()
    if not env.get("device"):
        print("featcal gpu run: no CUDA device is visible; nothing run (see --dry-run)", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "bench" / "results" / slug(env["device"])).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "budget_s": args.budget, "steps": []}
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="featcal-gpu-run-") as links:
        mirror = link_package(Path(links) / "featcal")
        for step in steps:
            record["steps"].append(asdict(_run_in_budget(step, out, mirror, deadline)))
            (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
            last = record["steps"][-1]
            print(f"{last['name']:<18} {last['status']:<10} {last['seconds']:>7.1f} s", flush=True)
    failed = [s["name"] for s in record["steps"] if s["status"] != "passed"]
    print(f"results in {out}; {'all steps passed' if not failed else 'not passed: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
