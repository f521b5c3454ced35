"""The cache of the demo's trained models: trained once per recipe, reused by every later run.

One safetensors file per recipe, `demo-<recipe hash>.safetensors` under the cache directory,
holds the base (`base/...`), each expert (`expert/<task>/...`) and each head (`head/<task>/...`);
its metadata holds the recipe. It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPVisionModel

from ..io.atomic_file import atomic_file
from ..io.user_cache import user_cache_dir
from .benchmark import Split, select_tasks
from .training import Recipe, build_encoder, build_head, finetune, pretrain

log = logging.getLogger("featcal")


@dataclass
class TrainedModels:
    """The base, and per task its expert encoder and its head."""

    base: CLIPVisionModel
    experts: dict[str, CLIPVisionModel]
    heads: dict[str, nn.Linear]


def cache_file(recipe: Recipe, root: Path | None = None) -> Path:
    return (root or user_cache_dir()) / f"demo-{recipe.key()}.safetensors"


def flat_state(models: TrainedModels) -> dict[str, Tensor]:
    """Every tensor of every model, under the cache file's names."""
    tensors = {f"base/{k}": v for k, v in models.base.state_dict().items()}
    for task, expert in models.experts.items():
        tensors |= {f"expert/{task}/{k}": v for k, v in expert.state_dict().items()}
        tensors |= {f"head/{task}/{k}": v for k, v in models.heads[task].state_dict().items()}
    return tensors


def save_models(path: Path, models: TrainedModels, recipe: Recipe) -> None:
    """All models into one safetensors file, written under a temporary name and renamed."""
    tensors = {k: v.contiguous() for k, v in flat_state(models).items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"recipe": json.dumps(asdict(recipe), sort_keys=True)})


def load_models(path: Path, recipe: Recipe) -> TrainedModels:
    """The models saved by `save_models` for `recipe`; raises if the file does not hold exactly them."""
    tensors = load_file(path)

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    base = build_encoder(recipe, recipe.seed)
    base.load_state_dict(part("base/"))
    experts, heads = {}, {}
    for task in select_tasks(recipe.tasks):
        experts[task.name] = build_encoder(recipe, recipe.seed)
        experts[task.name].load_state_dict(part(f"expert/{task.name}/"))
        heads[task.name] = build_head(recipe, task.classes, recipe.seed)
        heads[task.name].load_state_dict(part(f"head/{task.name}/"))
    return TrainedModels(base, experts, heads)


def load_or_train(
    recipe: Recipe, split: Split, *, root: Path | None = None, retrain: bool = False, progress: bool = True
) -> tuple[TrainedModels, Path, bool]:
    """The recipe's trained models from the cache, else trained now and cached. Returns the
    models, the cache file, and whether it was reused. An unreadable entry is trained anew."""
    path = cache_file(recipe, root)
    if path.exists() and not retrain:
        try:
            return load_models(path, recipe), path, True
        except (OSError, RuntimeError, SafetensorError) as err:
            log.warning("cached demo models %s are unreadable (%s); training them again", path, err)
    base = pretrain(recipe, split, progress)
    experts, heads = {}, {}
    for index, task in enumerate(select_tasks(recipe.tasks)):
        experts[task.name], heads[task.name] = finetune(base, task, index, recipe, split, progress)
    models = TrainedModels(base, experts, heads)
    save_models(path, models, recipe)
    return models, path, False
