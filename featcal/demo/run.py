"""`featcal demo`: experts on the digits benchmark, a merge that loses accuracy, and FeatCal
winning it back, measured on held-out data.

The base encoder is pretrained on upright digits; one expert per task is fine-tuned from it
with a head of its own; the experts are merged by Task Arithmetic (or TIES); FeatCal calibrates
the merged encoder through the public API from a few unlabeled training images per task. Each
task is then scored on its held-out test images with its own expert's head: by the expert, by
the merged encoder, and by the calibrated one.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, extension
from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..merging import task_arithmetic, ties_merging
from ..pipeline.driver import calibrate
from ..pipeline.report import CalibrationReport, write_json_atomic
from .benchmark import (
    Split,
    Task,
    calibration_inputs,
    load_digits_split,
    select_tasks,
    task_inputs,
    validation_inputs,
)
from .cache import TrainedModels, load_or_train
from .plot import plot_demo
from .training import Recipe, accuracy
from .tuning import GRID, Tuning, coordinate_sweep

MERGE_METHODS = {"ta": "Task Arithmetic", "ties": "TIES"}
DEFAULT_SCALING = {"ta": 0.3, "ties": 1.0}
CALIBRATION_BATCH = 128


@dataclass
class DemoConfig:
    """What the demo trains (`recipe`), how it merges, and how FeatCal runs.

    samples_per_task: unlabeled training images per task that FeatCal sees (256, as the reference).
    merge: "ta" or "ties"; scaling: of the merged task vector (None: 0.3 for ta, 1.0 for ties);
    density: the fraction of each task vector that TIES keeps.
    featcal: FeatCal's hyperparameters (the report's drift is measured on the whole first batch).
    sweep_samples: also calibrate with each of these numbers of examples per task.
    tune: first pick lambda, rho and alpha by a coordinate sweep (featcal.demo.tuning) on
    `validation_per_task` labeled training images per task that no calibration draw uses.
    out: directory for report.json and demo.png. cache_dir: where trained models are kept
    (None: featcal's user cache); retrain: ignore a cached entry.
    """

    recipe: Recipe = field(default_factory=Recipe)
    samples_per_task: int = 256
    merge: str = "ta"
    scaling: float | None = None
    density: float = 0.2
    featcal: FeatCalConfig = field(default_factory=lambda: FeatCalConfig(drift_examples=None))
    sweep_samples: Sequence[int] = ()
    tune: bool = False
    validation_per_task: int = 300
    out: Path = Path("featcal-demo")
    cache_dir: Path | None = None
    retrain: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.merge not in MERGE_METHODS:
            raise FeatCalError(f"merge={self.merge!r} is not one of {', '.join(MERGE_METHODS)}")
        if self.scaling is None:
            self.scaling = DEFAULT_SCALING[self.merge]


def run_demo(config: DemoConfig) -> dict:
    """Train (or load from the cache), merge, calibrate, evaluate; write `report.json` and
    `demo.png` under `config.out` and return the report."""
    start = time.perf_counter()
    recipe = config.recipe
    tasks = select_tasks(recipe.tasks)
    split = load_digits_split(recipe.test_size, recipe.seed)
    reserved = config.validation_per_task if config.tune else 0
    for count in (config.samples_per_task, *config.sweep_samples):  # a bad count, before training
        calibration_inputs(tasks[0], split, count, recipe.seed, reserved)
    extension.load()  # a first run builds featcal._C here, outside the timed calibration

    models_start = time.perf_counter()
    models, cache_path, reused = load_or_train(
        recipe, split, root=config.cache_dir, retrain=config.retrain, progress=config.progress
    )
    training_seconds = time.perf_counter() - models_start
    merged = _merge(models, config)
    test = {t.name: task_inputs(t, split.test_images, split.test_digits) for t in tasks}

    def scores(encoders: dict[str, torch.nn.Module]) -> dict[str, float]:
        """Each task's accuracy with its encoder and its expert's head."""
        return {t.name: accuracy(encoders[t.name], models.heads[t.name], *test[t.name]) for t in tasks}

    def everywhere(encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return dict.fromkeys(models.experts, encoder)

    expert_acc = scores(models.experts)
    merged_acc = scores(everywhere(merged))
    featcal_config, tuning = config.featcal, None
    if config.tune:
        tuning = _tune(models, merged, tasks, split, config)
        featcal_config = replace(featcal_config, **tuning.chosen)
    calibrated, report, seconds = _calibrate(
        models, merged, tasks, split, config.samples_per_task, recipe.seed, featcal_config
    )
    featcal_acc = scores(everywhere(calibrated))

    sweep = []
    for count in config.sweep_samples:
        if count == config.samples_per_task:  # seeded, so the same run as above
            accuracies, sweep_seconds = featcal_acc, seconds
        else:
            encoder, _, sweep_seconds = _calibrate(
                models, merged, tasks, split, count, recipe.seed, featcal_config
            )
            accuracies = scores(everywhere(encoder))
        sweep.append({"samples_per_task": count, "featcal": _mean(accuracies), "seconds": sweep_seconds})

    result = {
        "tasks": {
            t.name: {
                "expert": expert_acc[t.name],
                "merged": merged_acc[t.name],
                "featcal": featcal_acc[t.name],
                "description": t.description,
                "classes": t.classes,
                "test_examples": len(test[t.name][1]),
            }
            for t in tasks
        },
        "average": {
            key: _mean(acc)
            for key, acc in (("expert", expert_acc), ("merged", merged_acc), ("featcal", featcal_acc))
        },
        "merge": {
            "method": config.merge,
            "name": MERGE_METHODS[config.merge],
            "scaling": config.scaling,
            "density": config.density if config.merge == "ties" else None,
        },
        "samples_per_task": config.samples_per_task,
        "featcal": {name: getattr(featcal_config, name) for name in (*GRID, "sequential")},
        "tuning": None
        if tuning is None
        else {**asdict(tuning), "validation_per_task": config.validation_per_task, "grid": GRID},
        "calibration_seconds": seconds,
        "drift": [
            {"block": b.index, "merged": b.drift_merged, "featcal": b.drift_calibrated} for b in report.blocks
        ],
        "sweep": sweep,
        "recipe": asdict(recipe),
        "models": {
            "cache": str(cache_path),
            "reused": reused,
            "seconds": None if reused else training_seconds,
        },
        "calibration_report": report.to_dict(),
        "environment": {
            "featcal": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": "cpu",
        },
    }
    average = result["average"]
    gap = average["expert"] - average["merged"]
    result["gain_points"] = 100 * (average["featcal"] - average["merged"])
    result["gap_recovered"] = (average["featcal"] - average["merged"]) / gap if gap > 0 else None
    result["total_seconds"] = time.perf_counter() - start

    out = Path(config.out)
    plot_demo(result, out / "demo.png")
    write_json_atomic(out / "report.json", result)
    return result


def _merge(models: TrainedModels, config: DemoConfig):
    if config.merge == "ta":
        return task_arithmetic(models.base, models.experts, scaling=config.scaling)
    return ties_merging(models.base, models.experts, scaling=config.scaling, density=config.density)


def _tune(models: TrainedModels, merged, tasks: list[Task], split: Split, config: DemoConfig) -> Tuning:
    """The knobs of `coordinate_sweep`, scored on the validation images."""
    started = time.perf_counter()
    seed = config.recipe.seed
    validation = {t.name: validation_inputs(t, split, config.validation_per_task, seed) for t in tasks}
    bar = tqdm(desc="featcal demo: tuning", unit=" calibrations", disable=not config.progress)

    def evaluate(featcal_config: FeatCalConfig) -> float:
        encoder, _, _ = _calibrate(
            models, merged, tasks, split, config.samples_per_task, seed, featcal_config
        )
        bar.update()
        return _mean({t.name: accuracy(encoder, models.heads[t.name], *validation[t.name]) for t in tasks})

    tuning = coordinate_sweep(evaluate, config.featcal)
    bar.close()
    tuning.seconds = time.perf_counter() - started
    return tuning


def _calibrate(
    models: TrainedModels,
    merged,
    tasks: list[Task],
    split: Split,
    count: int,
    seed: int,
    featcal_config: FeatCalConfig,
) -> tuple[torch.nn.Module, CalibrationReport, float]:
    """A calibrated copy of `merged` from `count` examples per task, its report, and the seconds
    that `featcal.calibrate` took."""
    student = copy.deepcopy(merged)
    data = {}
    for task in tasks:
        inputs = calibration_inputs(task, split, count, seed)
        data[task.name] = [{"pixel_values": b} for b in inputs.split(CALIBRATION_BATCH)]
    featcal_config = replace(featcal_config, progress=False)
    start = time.perf_counter()
    report = calibrate(
        student, base=models.base, experts=models.experts, data=data, config=featcal_config
    ).report
    return student, report, time.perf_counter() - start


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def summary(result: dict) -> str:
    """The demo's tables as text: accuracy per task, averages, the gap recovered, the sweep."""
    recipe, merge = result["recipe"], result["merge"]
    lines = [
        f"featcal demo: {len(result['tasks'])} tasks on scikit-learn's digits, a CLIP-style encoder "
        f"({recipe['layers']} blocks, width {recipe['hidden_size']}), merged by "
        f"{merge['name']} (scaling {merge['scaling']:g})",
        "",
        f"{'task':<10}{'inputs; labels':<44}{'expert':>8}{'merged':>8}{'+FeatCal':>10}",
    ]
    for name, row in result["tasks"].items():
        lines.append(
            f"{name:<10}{row['description']:<44}{100 * row['expert']:>8.1f}{100 * row['merged']:>8.1f}"
            f"{100 * row['featcal']:>10.1f}"
        )
    avg = result["average"]
    lines.append(
        f"{'average':<54}{100 * avg['expert']:>8.1f}{100 * avg['merged']:>8.1f}{100 * avg['featcal']:>10.1f}"
    )
    recovered = result["gap_recovered"]
    lines += [
        "",
        f"FeatCal: {result['gain_points']:+.1f} points over the merge"
        + (f", {100 * recovered:.0f}% of the gap to the experts recovered" if recovered is not None else ""),
        f"calibration: {result['calibration_seconds']:.2f} s on the CPU from {result['samples_per_task']} "
        f"unlabeled examples per task; accuracy on {next(iter(result['tasks'].values()))['test_examples']} "
        "held-out examples per task",
        _knobs(result),
    ]
    if result["sweep"]:
        lines += ["", f"{'examples per task':<20}{'+FeatCal average':>18}{'calibration s':>15}"]
        for row in result["sweep"]:
            lines.append(f"{row['samples_per_task']:<20}{100 * row['featcal']:>18.1f}{row['seconds']:>15.2f}")
    models = result["models"]
    trained = "reused from" if models["reused"] else f"trained in {models['seconds']:.0f} s, cached in"
    lines += ["", f"models {trained} {models['cache']}; total {result['total_seconds']:.0f} s"]
    return "\n".join(lines)


def _knobs(result: dict) -> str:
    """FeatCal's knobs in the summary, and how --tune picked them."""
    knobs = result["featcal"]
    line = (
        f"knobs: lambda {knobs['lambda_ratio']:g}, rho {knobs['anchor_blend_rho']:g}, "
        f"alpha {knobs['teacher_interp_alpha']:g}, sequential statistics {knobs['sequential']}"
    )
    tuning = result["tuning"]
    if tuning is None:
        return line
    return (
        f"{line}; picked by a coordinate sweep of {len(tuning['trials'])} calibrations in "
        f"{tuning['seconds']:.0f} s, scored on {tuning['validation_per_task']} validation images per "
        f"task ({100 * tuning['validation']:.1f}%), never the test images"
    )
