"""The inputs of a mergekit merge, read from the `mergekit_config.yml` it writes beside its output.

`featcal calibrate --merged OUT` without --base/--experts takes them from there: the base is
`base_model` (or a slice's `base_model`), the experts every other model named in `models` or in
`slices`, each called by the last component of its path. A slices recipe is accepted when every
model it names enters whole: the slices, in order, cover layers 0 to the merged model's layer
count without gaps, and every source of a slice takes that slice's layer range. Frankenmerges
(passthrough stacks of partial layer ranges), LoRA references (`model+lora`) and `modules`
recipes are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatCalError

RECIPE_FILE = "mergekit_config.yml"


@dataclass(frozen=True)
class MergekitRecipe:
    """What a mergekit output was made from: its recipe file, merge method, base and experts
    (task name -> the model reference as the recipe writes it, a path or a hub id)."""

    path: Path
    merge_method: str
    base: str | None
    experts: dict[str, str]

    def describe(self) -> str:
        experts = ", ".join(f"{task}={ref}" for task, ref in self.experts.items())
        return f"{self.path}: {self.merge_method} merge of base {self.base} and experts {experts}"


def read_recipe(merged: Path) -> MergekitRecipe | None:
    """The recipe of the mergekit output directory `merged` (None when it has none)."""
    path = merged / RECIPE_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FeatCalError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise FeatCalError(f"{path} does not hold a mergekit recipe (a mapping with merge_method)")
    if recipe.get("modules"):
        raise FeatCalError(f"{path}: recipes with `modules` are not supported; give --base and --experts")
    base = _reference(path, recipe.get("base_model"), "base_model")
    models = [
        _reference(path, m.get("model") if isinstance(m, dict) else m, "models[]")
        for m in _list(path, recipe, "models")
    ]
    if recipe.get("slices"):
        slice_base, sliced = _slice_models(path, recipe["slices"], _layer_count(merged))
        base, models = base or slice_base, models + sliced
    if base is None:
        raise FeatCalError(
            f"{path} names no base_model (merge_method {recipe.get('merge_method')}): FeatCal needs the base "
            "the experts were fine-tuned from; give --base and --experts"
        )
    experts: dict[str, str] = {}
    for ref in models:
        if ref == base or ref in experts.values():
            continue
        name = _name(ref)
        if name in experts:
            raise FeatCalError(
                f"{path}: experts {experts[name]} and {ref} would both be called {name!r}; "
                "give --experts NAME=PATH for each"
            )
        experts[name] = ref
    if not experts:
        raise FeatCalError(
            f"{path} names no model besides its base {base}: there is nothing to calibrate toward"
        )
    return MergekitRecipe(path, str(recipe.get("merge_method")), base, experts)


def _list(path: Path, recipe: dict, key: str) -> list:
    value = recipe.get(key) or []
    if not isinstance(value, list):
        raise FeatCalError(f"{path}: {key} must be a list, got {type(value).__name__}")
    return value


def _reference(path: Path, value, where: str) -> str | None:
    """A model reference of the recipe as a path or hub id string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FeatCalError(f"{path}: {where} must name a model by path or hub id, got {value!r}")
    if "+" in value:
        raise FeatCalError(
            f"{path}: {where} {value} applies a LoRA adapter; featcal needs the experts as whole models "
            "(merge the adapter into its model first and give --experts)"
        )
    return value


def _slice_models(path: Path, slices, layers: int | None) -> tuple[str | None, list[str]]:
    """(a slice's base_model, the models of the slices), refusing slices that take partial models."""
    if not isinstance(slices, list):
        raise FeatCalError(f"{path}: slices must be a list")
    base, models, start = None, [], 0
    for number, piece in enumerate(slices):
        sources = piece.get("sources") if isinstance(piece, dict) else None
        if not sources or not isinstance(sources, list):
            raise FeatCalError(f"{path}: slice {number} has no sources")
        base = base or _reference(path, piece.get("base_model"), f"slice {number} base_model")
        spans = []
        for source in sources:
            ref = _reference(
                path, source.get("model") if isinstance(source, dict) else None, f"slice {number}"
            )
            if ref is None:
                raise FeatCalError(f"{path}: a source of slice {number} names no model")
            span = source.get("layer_range")
            if not (isinstance(span, list) and len(span) == 2 and span[0] == start and span[1] > start):
                raise FeatCalError(
                    f"{path}: slice {number} takes layers {span} of {ref}, but featcal calibrates merges of "
                    f"whole models: slices covering every layer once, in order (slice {number} would start "
                    f"at layer {start}); give --base and --experts if the models are whole"
                )
            spans.append(span[1])
            models.append(ref)
        if len(set(spans)) > 1:
            raise FeatCalError(f"{path}: the sources of slice {number} take different layer ranges")
        start = spans[0]
    if layers is not None and start != layers:
        raise FeatCalError(
            f"{path}: the slices cover layers 0 to {start} but the merged model has {layers}: featcal "
            "calibrates merges of whole models"
        )
    return base, models


def _layer_count(merged: Path) -> int | None:
    try:
        config = json.loads((merged / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return config.get("num_hidden_layers", config.get("num_layers"))


def _name(ref: str) -> str:
    return Path(ref.rstrip("/")).name or ref
