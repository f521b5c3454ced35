"""The `featcal` command: merge experts, make calibration data, calibrate a merged model.

    featcal merge --method ta|ties --base BASE --experts t1=DIR[:WEIGHT] ... --out MERGED
    featcal data --model DIR FILES... --out t1.safetensors   (through datasets and the model's processor)
    featcal calibrate --base BASE --merged MERGED --experts t1=DIR ... --data t1=FILE ... --out OUT
    featcal calibrate --merged MERGEKIT_OUT --data t1=FILE ... --out OUT   (from mergekit_config.yml)
    torchrun --nproc-per-node N -m featcal calibrate ...   (the same run over N processes)
    featcal demo              (experts on scikit-learn's digits, their merge, FeatCal; no download)
    featcal backends          (builds featcal._C if needed; what serves each op)

Bad input exits with status 2 and a one-line message naming what is wrong, checked before any
long work where it can be; outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import data_command, extension, ops
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


def _weighted(values: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    """TASK=PATH[:WEIGHT] arguments -> (task -> path, task -> weight where one is given). A PATH
    that exists as given keeps its ':' (a directory named step:100 is a path, not a weight)."""
    paths, weights = {}, {}
    for task, item in _pairs(values, "--experts").items():
        path, sep, weight = item.rpartition(":")
        try:
            value = float(weight) if sep and path and not Path(item).exists() else None
        except ValueError:
            value = None  # a ':' that is part of the path
        if value is None:
            paths[task] = item
        else:
            paths[task], weights[task] = path, value
    return paths, weights


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = action.nargs != 0 and action.default not in (None, False, argparse.SUPPRESS, [])
        if shown and action.option_strings and "%(default)" not in help_text and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def _common(parser: argparse.ArgumentParser, *, recipe: bool = False) -> None:
    optional = " (default: from the merged directory's mergekit_config.yml)" if recipe else ""
    parser.add_argument(
        "--base", required=not recipe, help="base (pretrained) model: directory or hub id" + optional
    )
    parser.add_argument(
        "--experts",
        nargs="+",
        required=not recipe,
        default=[],
        metavar="TASK=PATH" if recipe else "TASK=PATH[:WEIGHT]",
        help="fine-tuned experts"
        + (optional + "; given ones replace the recipe's of that name" if recipe else ""),
    )
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _hyperparameter_options(parser: argparse.ArgumentParser) -> None:
    """FeatCal's hyperparameters (FeatCalConfig's fields of the same names)."""
    defaults = FeatCalConfig()
    parser.add_argument(
        "--lambda-ratio",
        type=float,
        default=defaults.lambda_ratio,
        help="ridge weight lambda pulling each parameter toward its anchor",
    )
    parser.add_argument(
        "--anchor-blend-rho",
        type=float,
        default=defaults.anchor_blend_rho,
        help="rho in the anchor rho * merged + (1 - rho) * base",
    )
    parser.add_argument(
        "--teacher-interp-alpha",
        type=float,
        default=defaults.teacher_interp_alpha,
        help="alpha in the teacher input alpha * x_expert + (1 - alpha) * x_merged",
    )
    parser.add_argument(
        "--covariance-eps", type=float, default=defaults.covariance_eps, help="eps, floor of the Gram norms"
    )
    parser.add_argument(
        "--no-calibrate-bias", dest="calibrate_bias", action="store_false", help="keep the merged biases"
    )
    parser.add_argument(
        "--no-calibrate-layernorm",
        dest="calibrate_layernorm",
        action="store_false",
        help="keep the merged norm weights",
    )
    parser.add_argument(
        "--cross-method",
        choices=["auto", "cross", "project"],
        default=defaults.cross_method,
        help="how the solve's right-hand side is accumulated (all give the same result)",
    )
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
        help="MoE: a routed expert reached by fewer calibration tokens keeps its merged weights",
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
    from . import __version__

    parser = argparse.ArgumentParser(prog="featcal", description="FeatCal post-merging calibration.")
    parser.add_argument("--version", action="version", version=f"featcal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = {"formatter_class": _HelpFormatter}

    merge = sub.add_parser(
        "merge",
        help="merge experts by Task Arithmetic or TIES",
        description="Merge experts: --experts math=DIR:0.4 gives an expert its weight (default 1). "
        "ta: base + scaling * sum_t w_t tau_t. ties: trim, elect sign, weighted disjoint mean; "
        "--trim per-tensor is mergekit's ties (its weight, density, lambda = --scaling, "
        "normalize: true), --trim global the TIES paper's.",
        **formatter,
    )
    _common(merge)
    merge.add_argument("--method", choices=["ta", "ties"], default="ta")
    merge.add_argument("--scaling", type=float, help="scaling of the merged task vector (ta: 0.3, ties: 1.0)")
    merge.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    merge.add_argument(
        "--trim",
        choices=["global", "per-tensor"],
        default="global",
        help="ties: keep the largest entries of each whole task vector, or of each tensor",
    )

    data_command.add_parser(sub)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate a merged model with FeatCal",
        description="Calibrate a merged model. A mergekit output directory names its base and experts in "
        "its mergekit_config.yml: then --base and --experts may be left out (each expert is called by the "
        "last part of its path, as --data NAME=FILE).",
        **formatter,
    )
    _common(cal, recipe=True)
    cal.add_argument("--merged", required=True, help="merged model: directory or hub id")
    cal.add_argument(
        "--data", nargs="+", required=True, metavar="TASK=FILE", help="safetensors input files (featcal data)"
    )
    defaults = FeatCalConfig()
    cal.add_argument("--batch-size", type=int, default=16, help="examples per forward")
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
        **formatter,
    )
    demo.add_argument("--out", type=Path, default=Path("featcal-demo"), help="for report.json and demo.png")
    demo.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    demo.add_argument(
        "--samples-per-task", type=int, help="unlabeled examples per task for FeatCal (default: 256)"
    )
    demo.add_argument("--merge", choices=["ta", "ties"], default="ta", help="how the experts are merged")
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
    sub.add_parser("backends", help="build featcal._C if needed and say what serves each op")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    from . import demo
    from .io.checkpoint import check_output

    check_output(args.out, args.overwrite)
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
    from .io.checkpoint import atomic_directory, check_output, check_outside, load_model, resolve, save_model
    from .io.lazy_checkpoint import LazyCheckpoint
    from .merging import MergeRecipe, merge_checkpoints, merge_states

    check_output(args.out, args.overwrite)
    experts_src, weights = _weighted(args.experts)
    scaling = args.scaling if args.scaling is not None else 0.3 if args.method == "ta" else 1.0
    recipe = MergeRecipe(args.method, scaling, args.density, args.trim, weights)
    base = resolve(args.base)
    experts = {task: resolve(path) for task, path in experts_src.items()}
    check_outside(args.out, {"base model": args.base, **{f"expert {t!r}": p for t, p in experts_src.items()}})
    sources = [base, *experts.values()]
    with atomic_directory(args.out, args.overwrite) as tmp:
        if all(isinstance(s, Path) and LazyCheckpoint.holds_safetensors(s) for s in sources):
            # Local safetensors checkpoints: merged a group of tensors at a time, never a whole model.
            merge_checkpoints(base, experts, tmp, recipe)
        else:
            modules = {task: load_model(path) for task, path in experts.items()}
            save_model(merge_states(load_model(base), modules, recipe), tmp, companions_from=base)
    trim = f" ({args.trim} trim)" if args.method == "ties" else ""
    print(f"merged {len(experts)} experts by {args.method}{trim} into {args.out}")


def run_calibrate(args) -> None:
    """Under torchrun, every process runs this; process 0 prints and writes."""
    with process_group_from_environment(args.device, args.distributed_timeout) as device:
        _calibrate(args, device)


def _calibrate(args, device: str | None) -> None:
    from .io.checkpoint import check_outside, load_model, resolve
    from .io.data_files import load_calibration_file
    from .io.lazy_checkpoint import LazyCheckpoint
    from .pipeline.checks import check_device, check_tasks
    from .pipeline.driver import calibrate
    from .pipeline.partial_output import inspect

    check_device(device)  # before the data and a merged model loaded whole
    if not in_process_group():  # under torchrun, rank 0 checks inside calibrate, with the others
        inspect(args.out, args.overwrite, args.resume)
    base, experts_src = _models(args)
    data_src = _pairs(args.data, "--data")
    inputs = {"merged model": args.merged, "base model": base}
    inputs |= {f"expert {t!r}": path for t, path in experts_src.items()}
    inputs |= {f"data file of task {t!r}": path for t, path in data_src.items()}
    check_outside(args.out, inputs)
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
        base=base,
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


def _models(args) -> tuple[str, dict[str, str]]:
    """(base, task -> expert) from --base and --experts, and for what they leave out, from the
    merged directory's mergekit_config.yml."""
    from .integrations.mergekit import RECIPE_FILE, read_recipe

    given = _pairs(args.experts, "--experts")
    merged = Path(args.merged).expanduser()
    recipe = read_recipe(merged) if merged.is_dir() and (args.base is None or not args.experts) else None
    if recipe is None:
        if args.base is None or not given:
            raise FeatCalError(
                f"give --base and --experts: {args.merged} has no {RECIPE_FILE} (as a mergekit output "
                "has) to name them"
            )
        return args.base, given
    unknown = sorted(set(given) - set(recipe.experts))
    if unknown and args.base is None:
        raise FeatCalError(
            f"--experts names {unknown}, which {recipe.path} does not: its experts are "
            f"{sorted(recipe.experts)}; give --base and all --experts to calibrate toward other experts"
        )
    experts = {**recipe.experts, **given} if not unknown else given
    print(f"featcal: {recipe.describe()}", file=sys.stderr)
    return args.base or recipe.base, experts


def run_backends(args: argparse.Namespace) -> None:
    for op, where in ops.backend_info().items():
        print(f"{op:<15} cpu: {where['cpu']:<20} cuda: {where['cuda']}")
    module = extension.load()
    print(f"featcal._C: {module.__file__}" if module else f"featcal._C: unavailable ({extension.error()})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
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


class _LogFormat(logging.Formatter):
    """featcal's info lines as `featcal: ...`, its warnings as `featcal: warning: ...`; other
    libraries' records as `name: level: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: "
        if record.name.split(".")[0] == "featcal":
            return f"featcal: {level if record.levelno >= logging.WARNING else ''}{record.getMessage()}"
        return f"{record.name}: {level}{record.getMessage()}"


def _log_to_stderr() -> None:
    """Log lines to stderr in _LogFormat: featcal's from info up (e.g. the first-use compile and
    its duration), other libraries' from warnings up."""
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(_LogFormat())
    logging.getLogger("featcal").setLevel(logging.INFO)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        commands = {
            "merge": run_merge,
            "calibrate": run_calibrate,
            "backends": run_backends,
            "demo": run_demo,
            "data": data_command.run,
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
