"""The `featcal` command: merge experts, and calibrate a merged model with FeatCal.

    featcal merge --method ta --base BASE --experts t1=DIR t2=DIR --out MERGED
    featcal calibrate --base BASE --merged MERGED --experts t1=DIR ... --data t1=FILE ... --out OUT
    torchrun --nproc-per-node N -m featcal calibrate ...   (the same run over N processes)
    featcal backends          (builds featcal._C if needed; what serves each op)
    featcal demo              (experts on scikit-learn's digits, their merge, FeatCal; no download)

Bad input exits with status 2 and a one-line message naming what is wrong; outputs are
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import extension, ops
from .config import SEQUENTIAL_MODES, FeatCalConfig
from .errors import FeatCalError
from .pipeline.distributed import in_process_group, is_first_process, process_group_from_environment
from .signals import Stopped, stop_on_signals


def _pairs(values: list[str], what: str) -> dict[str, str]:
    """Parse task=VALUE arguments into an ordered dict; refuse malformed or repeated tasks."""
    pairs: dict[str, str] = {}
    for value in values:
        task, sep, item = value.partition("=")
        if not sep or not task or not item:
            raise FeatCalError(f"{what} must be given as task=VALUE, got {value!r}")
        if task in pairs:
            raise FeatCalError(f"task {task!r} is given twice in {what}")
        pairs[task] = item
    return pairs


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base (pretrained) model: directory or hub id")
    parser.add_argument("--experts", nargs="+", required=True, metavar="TASK=PATH", help="fine-tuned experts")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _hyperparameter_options(parser: argparse.ArgumentParser) -> None:
    """FeatCal's hyperparameters (FeatCalConfig's fields of the same names)."""
    defaults = FeatCalConfig()
    parser.add_argument("--lambda-ratio", type=float, default=defaults.lambda_ratio, help="ridge weight")
    parser.add_argument("--anchor-blend-rho", type=float, default=defaults.anchor_blend_rho)
    parser.add_argument("--teacher-interp-alpha", type=float, default=defaults.teacher_interp_alpha)
    parser.add_argument("--covariance-eps", type=float, default=defaults.covariance_eps)
    parser.add_argument("--no-calibrate-bias", dest="calibrate_bias", action="store_false")
    parser.add_argument("--no-calibrate-layernorm", dest="calibrate_layernorm", action="store_false")
    parser.add_argument("--cross-method", choices=["auto", "cross", "project"], default=defaults.cross_method)
    parser.add_argument(
        "--sequential",
        choices=list(SEQUENTIAL_MODES),
        default=defaults.sequential,
        help="re-take each sub-layer's (or each module group's) statistics after the ones before "
        "it in the block are solved (off: one pass, as published)",
    )
    parser.add_argument(
        "--min-expert-tokens",
        type=int,
        default=defaults.min_expert_tokens,
        help=f"MoE: a routed expert reached by fewer calibration tokens keeps its merged weights "
        f"(default {defaults.min_expert_tokens})",
    )


def _hyperparameters(args: argparse.Namespace) -> dict:
    names = ("lambda_ratio", "anchor_blend_rho", "teacher_interp_alpha", "covariance_eps")
    names += ("calibrate_bias", "calibrate_layernorm", "cross_method", "sequential", "min_expert_tokens")
    return {name: getattr(args, name) for name in names}


def _counts(text: str) -> list[int]:
    """'8,32,128' -> [8, 32, 128]."""
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featcal", description="FeatCal post-merging calibration.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge experts by Task Arithmetic or TIES")
    _common(merge)
    merge.add_argument("--method", choices=["ta", "ties"], default="ta")
    merge.add_argument("--scaling", type=float, help="scaling of the merged task vector (ta: 0.3, ties: 1.0)")
    merge.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")

    sub.add_parser("backends", help="build featcal._C if needed and say what serves each op")

    cal = sub.add_parser("calibrate", help="calibrate a merged model with FeatCal")
    _common(cal)
    cal.add_argument("--merged", required=True, help="merged model: directory or hub id")
    cal.add_argument("--data", nargs="+", required=True, metavar="TASK=FILE", help="safetensors input files")
    defaults = FeatCalConfig()
    cal.add_argument("--batch-size", type=int, default=16)
    cal.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    cal.add_argument("--report", type=Path, help="also write the JSON report here")
    cal.add_argument(
        "--resume",
        action="store_true",
        help="go on from the finished blocks of an interrupted run (kept in OUT.featcal-partial)",
    )
    cal.add_argument(
        "--distributed-timeout",
        type=float,
        default=defaults.distributed_timeout,
        help="under torchrun: seconds a process waits for the others before the run stops",
    )
    _hyperparameter_options(cal)
    cal.add_argument(
        "--streams",
        choices=["auto", "device", "cpu", "disk"],
        default=defaults.stream_placement,
        help="where hidden states between blocks live (auto: the first that fits the budgets)",
    )
    cal.add_argument(
        "--max-gpu-memory", help="GPU memory budget, e.g. 12GiB; refused before any work if short"
    )
    cal.add_argument("--max-cpu-memory", help="CPU memory budget, e.g. 64GiB")
    cal.add_argument("--offload-dir", help="directory for disk streams (default: a temporary directory)")
    cal.add_argument(
        "--drift-examples",
        type=int,
        default=defaults.drift_examples,
        help="examples per task on which the report measures feature drift (0: none)",
    )

    demo = sub.add_parser(
        "demo",
        help="the main job on real data, nothing to download: experts, their merge, FeatCal",
        description="Trains a CLIP-style base and one expert per task on scikit-learn's digits "
        "(cached after the first run), merges the experts, calibrates the merge with FeatCal and "
        "scores every task on held-out data.",
    )
    demo.add_argument("--out", type=Path, default=Path("featcal-demo"), help="for report.json and demo.png")
    demo.add_argument(
        "--samples-per-task", type=int, help="unlabeled examples per task for FeatCal (default: 256)"
    )
    demo.add_argument("--merge", choices=["ta", "ties"], default="ta")
    demo.add_argument("--scaling", type=float, help="of the merged task vector (ta: 0.3, ties: 1.0)")
    demo.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    _hyperparameter_options(demo)
    demo.add_argument(
        "--sweep-samples",
        type=_counts,
        default=[],
        metavar="N,N,...",
        help="also calibrate with these examples per task",
    )
    demo.add_argument(
        "--tune",
        action="store_true",
        help="pick lambda, rho and alpha by a coordinate sweep on validation images (never the test set)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a smaller model and shorter training (a smoke test)"
    )
    demo.add_argument("--cache-dir", type=Path, help="for the trained models (default: featcal's user cache)")
    demo.add_argument("--retrain", action="store_true", help="train again even if the models are cached")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    from . import demo

    samples = demo.DemoConfig.samples_per_task if args.samples_per_task is None else args.samples_per_task
    config = demo.DemoConfig(
        recipe=demo.QUICK_RECIPE if args.quick else demo.Recipe(),
        samples_per_task=samples,
        merge=args.merge,
        scaling=args.scaling,
        density=args.density,
        featcal=FeatCalConfig(**_hyperparameters(args), drift_examples=None),
        sweep_samples=args.sweep_samples,
        tune=args.tune,
        out=args.out,
        cache_dir=args.cache_dir,
        retrain=args.retrain,
        progress=not args.quiet,
    )
    print(demo.summary(demo.run_demo(config)))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'demo.png'}")


def run_merge(args) -> None:
    from .io.checkpoint import atomic_directory, check_output, load_model, resolve, save_model
    from .io.lazy_checkpoint import LazyCheckpoint
    from .merging import task_arithmetic, task_arithmetic_checkpoints, ties_merging

    check_output(args.out, args.overwrite)
    experts_src = _pairs(args.experts, "--experts")
    sources = [resolve(args.base), *map(resolve, experts_src.values())]
    lazy = all(isinstance(s, Path) and LazyCheckpoint.holds_safetensors(s) for s in sources)
    scaling = args.scaling if args.scaling is not None else 0.3 if args.method == "ta" else 1.0
    with atomic_directory(args.out, args.overwrite) as tmp:
        if args.method == "ta" and lazy:
            # Local safetensors checkpoints: merged a group of tensors at a time, never a whole model.
            task_arithmetic_checkpoints(sources[0], dict(zip(experts_src, sources[1:])), tmp, scaling=scaling)
        else:
            base = load_model(sources[0])
            experts = {task: load_model(path) for task, path in zip(experts_src, sources[1:])}
            if args.method == "ta":
                merged = task_arithmetic(base, experts, scaling=scaling)
            else:
                merged = ties_merging(base, experts, scaling=scaling, density=args.density)
            save_model(merged, tmp, companions_from=sources[0])
    print(f"merged {len(experts_src)} experts by {args.method} into {args.out}")


def run_calibrate(args) -> None:
    """Under torchrun, every process runs this; process 0 prints and writes."""
    with process_group_from_environment(args.device, args.distributed_timeout) as device:
        _calibrate(args, device)


def _calibrate(args, device: str | None) -> None:
    from .io.checkpoint import load_model, resolve
    from .io.data_files import load_calibration_file
    from .io.lazy_checkpoint import LazyCheckpoint
    from .pipeline.checks import check_tasks
    from .pipeline.driver import calibrate
    from .pipeline.partial_output import inspect

    if not in_process_group():  # under torchrun, rank 0 checks inside calibrate, with the others
        inspect(args.out, args.overwrite, args.resume)
    experts_src = _pairs(args.experts, "--experts")
    data_src = _pairs(args.data, "--data")
    config = FeatCalConfig(
        **_hyperparameters(args),
        drift_examples=args.drift_examples,
        stream_placement=args.streams,
        max_gpu_memory=args.max_gpu_memory,
        max_cpu_memory=args.max_cpu_memory,
        offload_dir=args.offload_dir,
        progress=not args.quiet,
        distributed_timeout=args.distributed_timeout,
    )
    check_tasks(experts_src, data_src)
    data = {task: load_calibration_file(path, args.batch_size) for task, path in data_src.items()}
    # A local safetensors checkpoint is streamed block by block; a hub id is loaded whole.
    merged = resolve(args.merged)
    if not (isinstance(merged, Path) and LazyCheckpoint.holds_safetensors(merged)):
        merged = load_model(merged)
    _, report = calibrate(
        merged,
        base=args.base,
        experts=experts_src,
        data=data,
        config=config,
        device=device,
        out=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    if not is_first_process():
        return
    if args.report:
        report.write_json(args.report)
    print(report.summary())
    print(f"wrote {args.out} (report: {args.out / 'featcal_report.json'})")


def run_backends(args: argparse.Namespace) -> None:
    for op, where in ops.backend_info().items():
        print(f"{op:<15} cpu: {where['cpu']:<20} cuda: {where['cuda']}")
    module = extension.load()
    print(f"featcal._C: {module.__file__}" if module else f"featcal._C: unavailable ({extension.error()})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="featcal: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        with stop_on_signals():
            return _dispatch(args)
    except Stopped as stop:
        notes = getattr(stop, "__notes__", [])
        after = "; ".join(notes) if notes else "no output was written; run the command again to start over"
        print(
            f"featcal: stopped by {stop}: the run was abandoned cleanly (its temporary files and disk "
            f"streams are removed); {after}",
            file=sys.stderr,
        )
        return stop.exit_status


def _dispatch(args: argparse.Namespace) -> int:
    try:
        commands = {
            "merge": run_merge,
            "calibrate": run_calibrate,
            "backends": run_backends,
            "demo": run_demo,
        }
        commands[args.command](args)
    except FeatCalError as err:
        # An error every process of a run raises alike is printed once, by process 0.
        if not getattr(err, "shared", False) or err.rank == 0:
            print(f"featcal: error: {err}", file=sys.stderr)
            for note in getattr(err, "__notes__", []):
                print(f"featcal: {note}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
