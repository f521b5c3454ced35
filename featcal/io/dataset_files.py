"""Calibration data from local files: json (or json lines), csv, parquet or an image folder, read
with Hugging Face `datasets` (the optional extra `featcal[data]`) and turned into the model's
inputs by its own tokenizer or image processor, as `featcal.io.data_files` stores them."""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..errors import FeatCalError

log = logging.getLogger(__name__)

FORMATS = ("json", "csv", "parquet", "imagefolder")
_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_UNBOUNDED = 10**9  # a tokenizer's model_max_length at or above this means "no limit"


def build_calibration_data(
    files: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    *,
    format: str | None = None,
    column: str | None = None,
    samples: int = 128,
    max_length: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """The inputs of `model` (a local model directory) for `samples` rows of `files`.

    `format` is one of FORMATS; by default it follows each file's suffix (.json/.jsonl, .csv,
    .parquet, an image's suffix) and is imagefolder for a directory. `column` holds the text or
    the images ("text" or "image" by default). Rows are drawn at random, reproducibly from `seed`
    (all of them, with a warning, if there are fewer) and kept in the order of the files; rows
    with no text or image are left out.
    Text comes back as `input_ids` and `attention_mask` (N, T): the tokenizer's output for the
    rows, truncated to `max_length` tokens (or the model's positions, if fewer) and right-padded
    to the longest row. Images come back as `pixel_values` (N, 3, H, W) from the model's image
    processor, on RGB images. Whether the model takes text or images comes from its config (a
    model with no vocabulary takes images), and from the data where the model takes both.
    Raises FeatCalError naming the file, column or model at fault.
    """
    if samples < 1:
        raise FeatCalError(f"samples must be >= 1, got {samples}")
    if max_length < 1:
        raise FeatCalError(f"max length must be >= 1, got {max_length}")
    paths = _input_paths(files)
    fmt = _format(paths, format)
    model = Path(model)
    if not model.is_dir():
        raise FeatCalError(f"no such model directory: {model}")
    datasets = _import_datasets()
    kinds = _model_kinds(model)
    with tempfile.TemporaryDirectory(prefix="featcal-data-") as cache, _quiet(datasets, progress):
        parts = _load(datasets, paths, fmt, cache)
        if column is None:
            column = _default_column(kinds, parts)
        kind = _data_kind(datasets, parts, column)
        if kind not in kinds:
            have = "images" if kind == "image" else "text"
            wants = "text" if kind == "image" else "images"
            raise FeatCalError(
                f"model {model} ({kinds.config_name}) takes {wants}, but column {column!r} of "
                f"{parts[0].name} holds {have}"
            )
        chosen = _choose(parts, column, samples, seed)
        if kind == "text":
            texts = [text for part, rows in chosen for text in part.dataset.select(rows)[column]]
            return _tokenize(texts, chosen, model, kinds.positions, max_length)
        return _pixels(datasets, chosen, column, model)


@dataclass
class _Part:
    """One source's rows: a data file (or, for imagefolder, all the inputs together)."""

    name: str
    dataset: object


@dataclass
class _Kinds:
    """What a model takes, from its config: text, images or both."""

    text: bool
    image: bool
    config_name: str
    positions: int | None = None  # the longest input the text model takes, if it says

    def __contains__(self, kind: str) -> bool:
        return self.text if kind == "text" else self.image


def _input_paths(files: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths:
        raise FeatCalError("no data files given")
    for path in paths:
        if not path.exists():
            raise FeatCalError(f"no such data file: {path}")
    return paths


def _format(paths: list[Path], format: str | None) -> str:
    """The format of the inputs: `format`, or the one their suffixes (or a directory) say."""
    if format is not None:
        if format not in FORMATS:
            raise FeatCalError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")
        found = {format}
    else:
        found = set()
        for path in paths:
            suffix = path.suffix.lower()
            if path.is_dir() or suffix in _IMAGE_SUFFIXES:
                found.add("imagefolder")
            elif suffix in _SUFFIXES:
                found.add(_SUFFIXES[suffix])
            else:
                raise FeatCalError(
                    f"cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
                    f"give it (--format): one of {', '.join(FORMATS)}"
                )
        if len(found) > 1:
            raise FeatCalError(
                f"the data files are of several formats ({', '.join(sorted(found))}); give one"
            )
    (fmt,) = found
    for path in paths:
        if path.is_dir() and fmt != "imagefolder":
            raise FeatCalError(f"{path} is a directory; only the imagefolder format reads directories")
    return fmt


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise FeatCalError(
            f'featcal data needs the datasets library ({err}): pip install "featcal[data]"'
        ) from None
    return datasets


@contextmanager
def _quiet(datasets, progress: bool) -> Iterator[None]:
    """datasets' own error logs silenced (errors come back as FeatCalError), and its progress
    bars too unless `progress`; both restored after."""
    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _model_kinds(model: Path) -> _Kinds:
    """Text if the model's config has a vocabulary, images if it has a vision part; both where it
    has both, or neither, or no config.json."""
    if not (model / "config.json").is_file():
        return _Kinds(text=True, image=True, config_name="no config.json")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as err:
        raise FeatCalError(f"could not read the config of model {model}: {_reason(err)}") from err
    text_config = config.get_text_config()
    text = getattr(text_config, "vocab_size", None) is not None
    image = (
        getattr(config, "vision_config", None) is not None or getattr(config, "image_size", None) is not None
    )
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    if not (text or image):
        text = image = True
    return _Kinds(text, image, type(config).__name__, positions if text else None)


def _load(datasets, paths: list[Path], fmt: str, cache: str) -> list[_Part]:
    """The inputs as datasets: one per file, or one for all the inputs of an image folder."""
    if fmt == "imagefolder":
        found = (q for p in paths for q in (p.rglob("*") if p.is_dir() else [p]))
        if not any(q.suffix.lower() in _IMAGE_SUFFIXES for q in found):
            raise FeatCalError(f"{', '.join(map(str, paths))} holds no images")
        # data_files are glob patterns: a path's own *, ? and [ are escaped.
        patterns = [glob.escape(str(p.resolve())) + ("/**" if p.is_dir() else "") for p in paths]
        name = ", ".join(map(str, paths))
        return [_Part(name, _load_one(datasets, fmt, patterns, name, paths, cache))]
    return [
        _Part(str(p), _load_one(datasets, fmt, [glob.escape(str(p.resolve()))], str(p), [p], cache))
        for p in paths
    ]


def _load_one(datasets, fmt: str, patterns: list[str], name: str, paths: list[Path], cache: str):
    try:
        dataset = datasets.load_dataset(
            fmt, data_files=patterns, split="train", keep_in_memory=True, cache_dir=cache
        )
    except Exception as err:  # datasets, pyarrow and pandas raise errors of many kinds
        if isinstance(err, datasets.data_files.EmptyDatasetError) or all(_empty(p, fmt) for p in paths):
            raise FeatCalError(f"{name} holds no {'images' if fmt == 'imagefolder' else 'rows'}") from err
        raise FeatCalError(f"could not read {name} as {fmt}: {_reason(err)}") from err
    if len(dataset) == 0:
        raise FeatCalError(f"{name} holds no rows")
    return dataset


def _empty(path: Path, fmt: str) -> bool:
    """Whether a file that datasets could not read is an empty one (which it reports as it may)."""
    try:
        if path.stat().st_size == 0:
            return True
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        if fmt == "csv":
            with open(path, encoding="utf-8", errors="replace") as f:
                return sum(1 for line in f if line.strip()) <= 1  # a header at most
        if fmt == "json":
            return path.read_text(encoding="utf-8", errors="replace").strip() in ("", "[]")
    except Exception:
        return False
    return False


def _reason(err: BaseException) -> str:
    """An error's message on one line: that of the first of it and its causes that says more
    than "an error occurred" (datasets wraps the reader's error in DatasetGenerationError)."""
    chain = []
    while err is not None and len(chain) < 8:
        chain.append(err)
        err = err.__cause__ or err.__context__
    specific = [e for e in chain if type(e).__name__ != "DatasetGenerationError"] or chain
    text = " ".join(str(specific[0]).split())
    return f"{type(specific[0]).__name__}: {text}" if text else type(specific[0]).__name__


def _default_column(kinds: _Kinds, parts: list[_Part]) -> str:
    """ "image" for a model of images only, or for one of both whose data have an image column;
    "text" otherwise. Where the data lack that column but have the other one, the other one (for
    the check that the model takes what it holds)."""
    features = parts[0].dataset.features
    has_image = "image" in features and _is_image(features["image"])
    column = "image" if kinds.image and (has_image or not kinds.text) else "text"
    other = "text" if column == "image" else "image"
    return other if column not in features and other in features else column


def _is_image(feature) -> bool:
    return type(feature).__name__ == "Image"


def _data_kind(datasets, parts: list[_Part], column: str) -> str:
    """ "text" or "image": what `column` holds in every part."""
    kinds = set()
    for part in parts:
        names = part.dataset.column_names
        if column not in names:
            raise FeatCalError(f"{part.name} has no column {column!r}; its columns: {', '.join(names)}")
        feature = part.dataset.features[column]
        if _is_image(feature):
            kinds.add("image")
        elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            kinds.add("text")
        else:
            what = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
            what = "values of mixed types" if what == "Json" else f"{what} values"
            raise FeatCalError(f"column {column!r} of {part.name} holds {what}, neither text nor images")
    if len(kinds) > 1:
        raise FeatCalError(f"column {column!r} holds text in some data files and images in others")
    return kinds.pop()


def _choose(parts: list[_Part], column: str, samples: int, seed: int) -> list[tuple[_Part, list[int]]]:
    """`samples` rows drawn at random from `seed` among the parts' rows that have a value in
    `column` (not null, and for text not blank): (part, its rows in file order) per part."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    usable = []
    for part in parts:
        values = part.dataset.data.column(column)
        keep = pc.is_valid(values)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            keep = pc.and_(keep, pc.not_equal(pc.utf8_trim_whitespace(values), ""))
        rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        if len(rows) < len(values):
            log.warning(
                "left out %d of the %d rows of %s with no value in column %r",
                len(values) - len(rows),
                len(values),
                part.name,
                column,
            )
        usable.append(rows)
    total = sum(len(rows) for rows in usable)
    if total == 0:
        raise FeatCalError(f"column {column!r} of {', '.join(p.name for p in parts)} holds no values")
    if total < samples:
        log.warning("only %d usable row(s), fewer than the %d samples asked for: using all", total, samples)
    picked = sorted(random.Random(seed).sample(range(total), min(samples, total)))
    chosen, start = [], 0
    for part, rows in zip(parts, usable):
        mine = [int(rows[i - start]) for i in picked if start <= i < start + len(rows)]
        if mine:
            chosen.append((part, mine))
        start += len(rows)
    return chosen


def _tokenize(
    texts: list[str],
    chosen: list[tuple[_Part, list[int]]],
    model: Path,
    positions: int | None,
    max_length: int,
) -> dict[str, Tensor]:
    tokenizer = _tokenizer(model)
    most = tokenizer.model_max_length
    limit = min(
        max_length,
        positions or max_length,
        most if isinstance(most, int) and most < _UNBOUNDED else max_length,
    )
    encoded = tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=limit,
        return_tensors="pt",
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    if limit < max_length and encoded["input_ids"].shape[1] == limit:
        lengths = tokenizer(texts, truncation=True, max_length=max_length, return_length=True)["length"]
        if any(length > limit for length in lengths):
            log.warning(
                "%d of the rows are cut at %d tokens, the most model %s takes, not at max length %d",
                sum(length > limit for length in lengths),
                limit,
                model,
                max_length,
            )
    inputs = {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}
    empty = (inputs["attention_mask"].sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        where = [(part.name, row) for part, rows in chosen for row in rows][empty[0]]
        raise FeatCalError(f"row {where[1]} of {where[0]} has no tokens under the tokenizer of model {model}")
    return inputs


def _tokenizer(model: Path):
    """The model's tokenizer, right-padding, with eos as the pad token if it has none."""
    if not any((model / name).is_file() for name in _TOKENIZER_FILES):
        raise FeatCalError(f"model {model} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as err:
        raise FeatCalError(f"could not load the tokenizer of model {model}: {_reason(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FeatCalError(f"the tokenizer of model {model} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _pixels(datasets, chosen: list[tuple[_Part, list[int]]], column: str, model: Path) -> dict[str, Tensor]:
    from PIL import Image

    if not any((model / name).is_file() for name in _PROCESSOR_FILES):
        raise FeatCalError(f"model {model} has no image processor (preprocessor_config.json)")
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
    except Exception as err:
        raise FeatCalError(f"could not load the image processor of model {model}: {_reason(err)}") from err
    images = []
    for part, rows in chosen:
        raw = part.dataset.select(rows).cast_column(column, datasets.Image(decode=False))[column]
        for row, item in zip(rows, raw):
            where = item.get("path") or f"row {row} of {part.name}"
            try:
                source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
                with Image.open(source) as image:
                    images.append(image.convert("RGB"))
            except Exception as err:
                raise FeatCalError(f"could not read image {where}: {_reason(err)}") from err
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise FeatCalError(
            f"the image processor of model {model} gives pixel_values of shape {tuple(pixels.shape)}, "
            "not (N, 3, H, W)"
        )
    return {"pixel_values": pixels.float()}
