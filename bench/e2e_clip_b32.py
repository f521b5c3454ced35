"""End-to-end benchmark "B32-4x32": featcal against the published reference, side by side.

The case: CLIP ViT-B/32 vision encoder (hidden 768, 12 blocks, 12 heads, MLP 3072, image 224,
patch 32), random init with seed 0; 4 experts = base + Gaussian deltas of 5% of each tensor's
std; Task Arithmetic 0.3; 32 random images per task, batch 16; float32; FeatCal defaults.
`--tasks 8 --images 256 --device cuda` is the B32-TA8 case of the GPU run (bench/gpu/run.py).

Implementations, each in its own process (so each peak RSS is its own), on the same case
built from the same seeds; the parent compares their calibrated weights and final features
with the reference's:

- featcal: `featcal.calibrate`;
- reference: the published reference's `CLIPFeatCalibrator.calibrate`;
- compat: that same reference calibrate loop with its two calibration functions,
  `collect_layer_statistics` and `merge_layer_parameters_with_featcal_stats`, replaced by
  `featcal.compat.official`'s (what a reference-style front end gets by swapping two imports).

    python bench/e2e_clip_b32.py                                        # featcal only
    python bench/e2e_clip_b32.py --reference /path/to/featcal-ref/src   # all three side by side
    python bench/e2e_clip_b32.py --reference ... --repeat 3             # interleaved, medians

`--reference` is the `src` folder of a checkout of github.com/egangu/featcal (kept outside this
repository). Only its calibrator is used; the harness feeds it the case's images instead of its
dataset loaders and points it at this transformers version's CLIP layout (blocks at
`encoder.layers`, block-0 input `pre_layrnorm(embeddings(x))`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from machine import cpu_name

SEED = 0
TASKS = 4
IMAGES = 32
BATCH = 16
SCALING = 0.3
IMPLEMENTATIONS = ("featcal", "reference", "compat")


def build_case(layers: int = 12, tasks: int = TASKS, images_per_task: int = IMAGES):
    """(base, experts, merged, images, eval_images), deterministic."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import featcal

    torch.manual_seed(SEED)
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    )
    base = CLIPVisionModel(config).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    experts = {}
    for t in range(tasks):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                if p.numel() > 1:
                    p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
        experts[f"task{t}"] = expert
    merged = featcal.task_arithmetic(base, experts, scaling=SCALING)
    images = {t: torch.randn(images_per_task, 3, 224, 224, generator=gen) for t in experts}
    eval_images = torch.randn(16, 3, 224, 224, generator=gen)
    return base, experts, merged, images, eval_images


def run_featcal(case, drift_examples: int | None, device: torch.device) -> float:
    import featcal

    base, experts, merged, images, _ = case
    config = featcal.FeatCalConfig(progress=False, drift_examples=drift_examples)
    data = {t: [{"pixel_values": b} for b in x.split(BATCH)] for t, x in images.items()}
    featcal.extension.load()  # a first use compiles featcal._C; not part of the timed run
    _sync(device)
    start = time.perf_counter()
    featcal.calibrate(merged, base=base, experts=experts, data=data, config=config, device=device)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def import_reference(src: str):
    """The reference's `featcal.featcal` module, imported from `src` beside this featcal (whose
    modules are put back in sys.modules once the reference has bound its names)."""
    ours = {name: m for name, m in sys.modules.items() if name == "featcal" or name.startswith("featcal.")}
    for name in ours:
        del sys.modules[name]
    # The reference's calibration module imports dataset and hub loaders it does not need here.
    for name in ("featcal.data", "featcal.models"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["featcal.data"].iter_limited_image_batches = None
    sys.modules["featcal.data"].load_task_dataset = None
    sys.modules["featcal.data"].make_clip_loader = None
    sys.modules["featcal.models"].load_vision_model = None
    sys.path.insert(0, src)
    try:
        import featcal.featcal as ref
    finally:
        sys.path.remove(src)
        for name in [m for m in sys.modules if m == "featcal" or m.startswith("featcal.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    assert Path(ref.__file__).resolve().is_relative_to(Path(src).resolve()), ref.__file__
    return ref


def run_reference(case, src: str, compat: bool, device: torch.device) -> float:
    ref = import_reference(src)
    if compat:
        import featcal
        from featcal.compat import official

        ref.collect_layer_statistics = official.collect_layer_statistics
        ref.merge_layer_parameters_with_featcal_stats = official.merge_layer_parameters_with_featcal_stats
        featcal.extension.load()  # as for featcal: a first use compiles featcal._C, not timed
    ref._clip_layers = lambda model: model.encoder.layers
    ref._clip_first_layer_input = lambda model, x: model.pre_layrnorm(model.embeddings(x))
    base, experts, merged, images, _ = case

    class Calibrator(ref.CLIPFeatCalibrator):
        def prepare_first_layer_inputs(self, *, merged_model, expert_models, tasks):
            first = ref._clip_first_layer_input
            with torch.no_grad():
                student = {
                    t: [first(merged_model, b.to(device)) for b in images[t].split(BATCH)] for t in tasks
                }
                expert = {
                    t: [first(expert_models[t], b.to(device)) for b in images[t].split(BATCH)] for t in tasks
                }
            return student, expert

    for model in (base, merged, *experts.values()):
        model.to(device)
    calibrator = Calibrator(ref.FeatCalConfig(), processor=None, device=device)
    _sync(device)
    start = time.perf_counter()
    calibrator.calibrate(merged_model=merged, base_model=base, expert_models=experts, tasks=list(experts))
    _sync(device)
    return time.perf_counter() - start


def child(which: str, out: str, src: str | None, args: argparse.Namespace) -> None:
    """Build the case, run one implementation, save its weights and final features."""
    import resource

    from safetensors.torch import save_file

    device = torch.device(args.device)
    case = build_case(args.layers, args.tasks, args.images)
    if which == "featcal":
        seconds = run_featcal(case, args.drift_examples, device)
    else:
        seconds = run_reference(case, src, compat=which == "compat", device=device)
    merged, eval_images = case[2].to(device), case[4].to(device)
    with torch.no_grad():
        feats = merged(pixel_values=eval_images).last_hidden_state.cpu()
    merged.cpu()
    tensors = {f"param.{k}": v.contiguous() for k, v in merged.state_dict().items()}
    tensors["features"] = feats.contiguous()
    save_file(tensors, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"which": which, "seconds": seconds, "peak_rss_bytes": peak}))


def compare(a: str, b: str) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    worst = max(
        ((x[k] - y[k]).norm() / y[k].norm().clamp_min(1e-30)).item()
        for k in y
        if k.startswith("param.")
        and y[k].is_floating_point()
        and "encoder.layers" in k
        and k.endswith("weight")
    )
    features = ((x["features"] - y["features"]).norm() / y["features"].norm()).item()
    return {"max_weight_rel_diff": worst, "features_rel_diff": features}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", help="src/ folder of a checkout of github.com/egangu/featcal")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved; medians reported")
    parser.add_argument("--layers", type=int, default=12, help="blocks (12 for the standard case)")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument(
        "--runs",
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} "
        "(default: all; only featcal without --reference)",
    )
    parser.add_argument(
        "--drift-examples", type=int, help="featcal's drift_examples (default: FeatCalConfig's)"
    )
    parser.add_argument("--tasks", type=int, default=TASKS, help=f"experts (default {TASKS}; B32-TA8: 8)")
    parser.add_argument(
        "--images",
        type=int,
        default=IMAGES,
        help=f"calibration images per task (default {IMAGES}; B32-TA8: 256)",
    )
    parser.add_argument("--device", default="cpu", help="where every implementation runs (default cpu)")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.reference, args)
        return

    import featcal

    drift = featcal.FeatCalConfig().drift_examples if args.drift_examples is None else args.drift_examples
    runs = [w for w in args.runs.split(",") if w] if args.runs else list(IMPLEMENTATIONS)
    if not args.reference:
        runs = [w for w in runs if w == "featcal"]
    unknown = sorted(set(runs) - set(IMPLEMENTATIONS))
    if unknown or not runs:
        parser.error(f"--runs: expected some of {', '.join(IMPLEMENTATIONS)}, got {args.runs!r}")
    results = {which: [] for which in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for which in runs:
                out = os.path.join(tmp, f"{which}.safetensors")
                cmd = [sys.executable, __file__, "--child", which, "--out", out, "--layers", str(args.layers)]
                cmd += [
                    "--drift-examples",
                    str(drift),
                    "--tasks",
                    str(args.tasks),
                    "--images",
                    str(args.images),
                ]
                cmd += ["--device", args.device]
                if args.reference:
                    cmd += ["--reference", args.reference]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        reference_out = os.path.join(tmp, "reference.safetensors")
        agreement = {
            which: compare(os.path.join(tmp, f"{which}.safetensors"), reference_out)
            for which in runs
            if which != "reference" and "reference" in runs
        }
    name = f"B32-{args.tasks}x{args.images}" + ("" if args.layers == 12 else f" ({args.layers} blocks)")
    device = torch.device(args.device)
    summary = {
        "case": name,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "featcal_config": {"drift_examples": drift},
        "repeat": args.repeat,
        "runs": {
            which: {
                "seconds": [r["seconds"] for r in rs],
                "median_seconds": _median([r["seconds"] for r in rs]),
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in rs) / 2**30,
            }
            for which, rs in results.items()
        },
        "versus_reference": {},
    }
    for which in agreement:
        pairs = [r["seconds"] / f["seconds"] for f, r in zip(results[which], results["reference"])]
        summary["versus_reference"][which] = {
            "speedup_per_pair": pairs,
            "speedup_median": _median(pairs),
            "agreement": agreement[which],
        }
    print(f"case {summary['case']} on {summary['machine']}, torch {summary['torch']}, drift_examples {drift}")
    for which, r in summary["runs"].items():
        times = ", ".join(f"{t:.1f}" for t in r["seconds"])
        rss = r["peak_rss_gib"]
        print(f"  {which:9s} median {r['median_seconds']:7.1f} s ({times})   peak RSS {rss:.2f} GiB")
    for which, v in summary["versus_reference"].items():
        print(
            f"  {which} vs reference: speed-up median {v['speedup_median']:.2f}x "
            f"(pairs: {', '.join(f'{p:.2f}' for p in v['speedup_per_pair'])}); "
            f"weights max rel diff {v['agreement']['max_weight_rel_diff']:.1e}, "
            f"final features rel diff {v['agreement']['features_rel_diff']:.1e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
