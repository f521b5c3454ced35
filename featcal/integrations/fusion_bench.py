"""featcal as a FusionBench method: `FeatCalAlgorithm` merges a model pool's experts (or takes a
given merged model) and calibrates the merge with FeatCal on a few train examples of each task.

`config_dir()` is the directory of this method's hydra config (`method=featcal`), for
`fusion_bench -cd DIR method=featcal modelpool=... taskpool=...`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..merging import task_arithmetic, ties_merging
from ..pipeline.driver import calibrate
from ..pipeline.report import CalibrationReport

try:
    from fusion_bench import BaseAlgorithm, BaseModelPool, SimpleProfilerMixin, auto_register_config
except ImportError as err:
    raise ImportError(
        f'featcal\'s FusionBench method needs FusionBench ({err}): pip install "featcal[fusion-bench]"'
    ) from err

__all__ = ["FeatCalAlgorithm", "config_dir"]

log = logging.getLogger(__name__)

MERGES = ("task_arithmetic", "ties")
_DEFAULT = FeatCalConfig()


def config_dir() -> Path:
    """The hydra config directory holding `method/featcal.yaml`, for `fusion_bench -cd`."""
    return Path(__file__).resolve().parent / "fusion_bench_config"


@auto_register_config
class FeatCalAlgorithm(SimpleProfilerMixin, BaseAlgorithm):
    """FeatCal on a FusionBench model pool.

    `run(modelpool)` takes the base from the pool's `_pretrained_` model and an expert from each
    of its other (non-special) models. The model calibrated is `merged_model` when given (a model
    name of the pool, e.g. `_merged_`, or a checkpoint directory loaded with the base's class),
    else the experts merged with `merge` ("task_arithmetic" or "ties") at `scaling` (None: the
    merge's own default, 0.3 or 1.0) and, for TIES, `density` and `trim` ("global" or
    "per-tensor"). Each expert's calibration data are `samples_per_task` examples of the pool's
    train dataset of the same name (the first of `torch.randperm(len(dataset),
    generator=torch.Generator().manual_seed(seed))`, in that order), images turned into
    `pixel_values` by the pool's processor, in batches of `batch_size`. The other arguments are
    `featcal.FeatCalConfig`'s fields, with its defaults; `device` is `featcal.calibrate`'s.
    Returns the calibrated model; its report is kept in `self.report`.
    """

    def __init__(
        self,
        merge: str = "task_arithmetic",
        scaling: float | None = None,
        density: float = 0.2,
        trim: str = "global",
        merged_model: str | None = None,
        samples_per_task: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        device: str | None = None,
        lambda_ratio: float = _DEFAULT.lambda_ratio,
        anchor_blend_rho: float = _DEFAULT.anchor_blend_rho,
        teacher_interp_alpha: float = _DEFAULT.teacher_interp_alpha,
        covariance_eps: float = _DEFAULT.covariance_eps,
        calibrate_bias: bool = _DEFAULT.calibrate_bias,
        calibrate_layernorm: bool = _DEFAULT.calibrate_layernorm,
        cross_method: str = _DEFAULT.cross_method,
        drift_examples: int | None = _DEFAULT.drift_examples,
        float32_precision: str = _DEFAULT.float32_precision,
        stream_placement: str = _DEFAULT.stream_placement,
        max_gpu_memory: int | str | None = _DEFAULT.max_gpu_memory,
        max_cpu_memory: int | str | None = _DEFAULT.max_cpu_memory,
        offload_dir: str | None = _DEFAULT.offload_dir,
        progress: bool = _DEFAULT.progress,
        distributed: str = _DEFAULT.distributed,
        distributed_timeout: float = _DEFAULT.distributed_timeout,
        sequential: str = _DEFAULT.sequential,
        min_expert_tokens: int = _DEFAULT.min_expert_tokens,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if merge not in MERGES:
            raise FeatCalError(f"merge={merge!r} is not one of {', '.join(MERGES)}")
        if samples_per_task < 1 or batch_size < 1:
            raise FeatCalError(
                f"samples_per_task and batch_size must be >= 1, got {samples_per_task} and {batch_size}"
            )
        self.featcal_config()  # bad FeatCal settings fail here, before any model is loaded
        self.report: CalibrationReport | None = None

    def featcal_config(self) -> FeatCalConfig:
        """The FeatCal settings of this method."""
        return FeatCalConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FeatCalConfig)})

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """The calibrated model (see the class docstring)."""
        if not modelpool.has_pretrained:
            raise FeatCalError(
                "the model pool has no `_pretrained_` model, the base FeatCal needs; its models are "
                f"{modelpool.all_model_names}"
            )
        tasks = [name for name in modelpool.model_names if name != self.merged_model]
        if not tasks:
            raise FeatCalError(f"the model pool has no expert models besides {modelpool.all_model_names}")
        with self.profile("load calibration data"):
            processor = _processor(modelpool)
            data = {task: self.calibration_batches(modelpool, task, processor) for task in tasks}
        with self.profile("load models"):
            base = modelpool.load_pretrained_model()
            experts = {task: modelpool.load_model(task) for task in tasks}
        with self.profile("merge"):
            merged = self._merged(modelpool, base, experts)
        with self.profile("calibrate"):
            result = calibrate(
                merged,
                base=base,
                experts=experts,
                data=data,
                config=self.featcal_config(),
                device=self.device,
            )
        self.report = result.report
        log.info("FeatCal calibrated the merged model of %d tasks:\n%s", len(tasks), result.report.summary())
        self.print_profile_summary()
        return result.model

    def calibration_batches(
        self, modelpool: BaseModelPool, task: str, processor: Callable[..., Mapping]
    ) -> list[dict[str, Tensor]]:
        """The calibration batches of `task`: its sampled train examples as `pixel_values`."""
        if task not in modelpool.train_dataset_names:
            raise FeatCalError(
                f"expert {task!r} has no train dataset in the model pool (its train datasets: "
                f"{modelpool.train_dataset_names}); FeatCal calibrates on a few examples of each task"
            )
        dataset = modelpool.load_train_dataset(task)
        if len(dataset) == 0:
            raise FeatCalError(f"the train dataset of expert {task!r} is empty")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        images = [_image(dataset[int(i)], task) for i in order[: self.samples_per_task]]
        batches = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batches.append({"pixel_values": processor(images=chunk, return_tensors="pt")["pixel_values"]})
        return batches

    def _merged(self, modelpool: BaseModelPool, base: nn.Module, experts: dict[str, nn.Module]) -> nn.Module:
        if self.merged_model is None:
            scaling = {} if self.scaling is None else {"scaling": self.scaling}
            if self.merge == "ties":
                return ties_merging(base, experts, density=self.density, trim=self.trim, **scaling)
            return task_arithmetic(base, experts, **scaling)
        if self.merged_model in modelpool.all_model_names:
            return modelpool.load_model(self.merged_model)
        if not Path(self.merged_model).is_dir():
            raise FeatCalError(
                f"merged_model={self.merged_model!r} is neither a model of the pool "
                f"({modelpool.all_model_names}) nor a checkpoint directory"
            )
        if not hasattr(type(base), "from_pretrained"):
            raise FeatCalError(
                f"merged_model={self.merged_model!r}: the base is a {type(base).__name__}, which cannot "
                "load a checkpoint directory (from_pretrained); name a model of the pool instead"
            )
        return type(base).from_pretrained(self.merged_model)


def _processor(modelpool: BaseModelPool) -> Callable[..., Mapping]:
    load = getattr(modelpool, "load_processor", None)
    if load is None:
        raise FeatCalError(
            f"the model pool is a {type(modelpool).__name__}, which has no processor (load_processor) "
            "to turn its train images into pixel_values; FeatCal's FusionBench method needs an image "
            "model pool such as CLIPVisionModelPool"
        )
    try:
        return load()
    except AssertionError as err:
        raise FeatCalError(f"the model pool's processor could not be loaded: {err}") from err


def _image(item, task: str):
    """The image of a dataset example: a dict with "image", or an (image, label) pair."""
    image = None
    if isinstance(item, Mapping):
        image = item.get("image")
    elif isinstance(item, (tuple, list)) and item:
        image = item[0]
    if not hasattr(image, "convert"):
        raise FeatCalError(
            f"the train dataset of expert {task!r} has examples of type {type(item).__name__} with no "
            'PIL image: each example must be a dict with an "image" or an (image, label) pair'
        )
    return image.convert("RGB")
