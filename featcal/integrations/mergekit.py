"""The inputs of a mergekit merge, read from the `mergekit_config.yml` it writes beside its output.

`featcal calibrate --merged OUT` without --base/--experts takes them from there: the base is
`base_model` (or a slice's `base_model`), the experts every other model named in `models` or in
`slices`, each called by the last component of its path. A slices recipe is accepted when every
model it names enters whole: the slices, in order, cover layers 0 to the merged model's layer
count without gaps, and every source of a slice takes that slice's layer range. Frankenmerges
(passthrough stacks of partial layer ranges), LoRA references (`model+lora`) and `modules`
recipes, and the methods that interpolate between models rather than add task vectors to a base
(slerp, nuslerp, passthrough), are refused with the reason. A relative path of the recipe that
does not exist from the working directory is looked up beside the merged directory, where
mergekit is usually run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatCalError

RECIPE_FILE = "mergekit_config.yml"
# merge methods whose base_model is an endpoint of an interpolation, not the experts' common base
INTERPOLATIONS = ("slerp", "nuslerp", "passthrough")


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
    method = str(recipe.get("merge_method"))
    if method in INTERPOLATIONS:
        raise FeatCalError(
            f"{path}: merge_method {method} interpolates between models; FeatCal calibrates merges of "
            "experts fine-tuned from one base: give --base (the pretrained model) and --experts"
        )
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
    written: dict[str, str] = {}  # name -> the reference as the recipe writes it
    for ref in models:
        if ref == base or ref in written.values():
            continue
        name = _name(ref)
        if name in experts:
            raise FeatCalError(
                f"{path}: experts {written[name]} and {ref} would both be called {name!r}; "
                "give --experts NAME=PATH for each"
            )
        experts[name], written[name] = _located(ref, path), ref
    if not experts:
        raise FeatCalError(
            f"{path} names no model besides its base {base}: there is nothing to calibrate toward"
        )
    return MergekitRecipe(path, method, _located(base, path), experts)


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
    base, models, start, first = None, [], 0, []
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
        names = sorted(set(models[len(models) - len(sources) :]))
        if number and names != first:
            raise FeatCalError(
                f"{path}: slice {number} merges {names} but slice 0 {first}: featcal calibrates merges of "
                "the same whole models in every layer; give --base and --experts if they are"
            )
        first = first if number else names
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


def _located(ref: str, recipe: Path) -> str:
    """A recipe's model reference made usable from here: as written when it exists (or is
    absolute), else beside the merged directory when it is there; a single name that is neither
    is refused (mergekit recipes name hub models as ORG/NAME)."""
    path = Path(ref).expanduser()
    if path.is_absolute() or path.exists():
        return ref
    beside = recipe.parent.parent / path
    if beside.exists():
        return str(beside)
    if len(path.parts) == 1:
        raise FeatCalError(
            f"{recipe} names the model {ref}, which is neither a directory here nor beside "
            f"{recipe.parent}: run featcal where mergekit ran, or give --base and --experts"
        )
    return ref
