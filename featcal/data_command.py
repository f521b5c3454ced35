"""`featcal data`: a calibration data file from local json, csv, parquet files or an image folder,
made with the model's own tokenizer or image processor (`featcal.io.dataset_files`).

    featcal data --model MODEL_DIR train.jsonl --out task.safetensors
    featcal data --model MODEL_DIR images/ --out task.safetensors --samples 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import FeatCalError
from .io.data_files import save_calibration_file
from .io.dataset_files import FORMATS, build_calibration_data


def add_parser(sub) -> None:
    """The "data" subcommand of the `featcal` parser."""
    parser = sub.add_parser(
        "data",
        help="build a calibration data file from local files",
        description="Draws rows at random from local data files (read with Hugging Face datasets: "
        'pip install "featcal[data]") and writes them as the model\'s inputs, for `featcal '
        "calibrate --data TASK=FILE`: text through the model's tokenizer, images through its image "
        "processor. Rows with no text or image are left out; with fewer rows than --samples, all are used.",
    )
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE_OR_DIR",
        help="json or json lines, csv, parquet files; image files or folders of them (subfolders too)",
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="DIR",
        help="local model directory with its config and its tokenizer or image processor",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="the safetensors file to write"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="of the files (default: from each file's suffix, imagefolder for a directory)",
    )
    parser.add_argument(
        "--column",
        metavar="NAME",
        help='holding the text or the images (default: "text", or "image" for a model of images)',
    )
    parser.add_argument(
        "--samples", type=int, default=128, metavar="N", help="rows drawn at random (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=512,
        metavar="T",
        help="text: tokens kept per row, fewer if the model takes fewer (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="of the random draw of rows (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    """Write the calibration data file and say what it holds."""
    out: Path = args.out
    if out.is_dir():
        raise FeatCalError(f"--out {out} is a directory; give the path of a .safetensors file")
    if out.resolve() in {f.resolve() for f in args.files}:
        raise FeatCalError(f"--out {out} is one of the input files")
    if out.exists() and not args.overwrite:
        raise FeatCalError(f"{out} exists; pass --overwrite to replace it")
    inputs = build_calibration_data(
        args.files,
        args.model,
        format=args.format,
        column=args.column,
        samples=args.samples,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.quiet,
    )
    save_calibration_file(out, inputs)
    print(f"wrote {describe(inputs)} to {out}")


def describe(inputs: dict) -> str:
    """E.g. "128 examples of text (9,310 tokens, padded to 97)" or "64 images (3x224x224)"."""
    if "pixel_values" in inputs:
        pixels = inputs["pixel_values"]
        count = pixels.shape[0]
        return f"{count} image{'s' * (count != 1)} ({'x'.join(map(str, pixels.shape[1:]))})"
    mask = inputs["attention_mask"]
    count = mask.shape[0]
    return (
        f"{count} example{'s' * (count != 1)} of text ({int(mask.sum()):,} tokens, padded to {mask.shape[1]})"
    )
