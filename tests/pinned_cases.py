"""The runs whose calibrated weights are pinned in tests/data/pinned_results.safetensors.

Each case calibrates a tiny model of one family through the public API, in memory (float64)
or streamed from sharded safetensors checkpoints (float32, disk streams), and returns every
parameter of its blocks plus the report's drift per block. The pinned file was written by
`python tests/pinned_cases.py --overwrite` with the featcal of commit 6fccffa (before the driver became
explicit phases), so the test that reads it shows that results did not move since. ViT is
pinned in memory only: a ViT checkpoint saved by transformers 5 does not stream (its tensor
names differ from the module's).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tiny_models import (
    BERT,
    CLIP_FULL,
    CLIP_VISION,
    GPT2,
    LLAMA,
    MISTRAL,
    QWEN2,
    ROBERTA,
    STACK_ADAPTER,
    T5,
    T5_ENCODER,
    TOY_KINDS,
    VIT,
    registered,
    save_checkpoints,
    setup,
)

from featcal import FeatCalConfig, calibrate

PINNED = Path(__file__).parent / "data" / "pinned_results.safetensors"

IN_MEMORY = [
    CLIP_VISION,
    CLIP_FULL,
    VIT,
    BERT,
    ROBERTA,
    LLAMA,
    MISTRAL,
    QWEN2,
    GPT2,
    T5,
    T5_ENCODER,
    TOY_KINDS,
]
STREAMED = [CLIP_VISION, BERT, LLAMA, GPT2, T5]


def _blocks_of(family, model) -> list:
    if family is T5:
        return [*model.encoder.block, *model.decoder.block]
    return list(family.blocks(model))


def _collect(family, model, report) -> dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(_blocks_of(family, model)):
        for name, value in block.state_dict().items():
            out[f"block{i}.{name}"] = value.detach().clone().contiguous()
    drift = [(b.drift_merged, b.drift_calibrated) for b in report.blocks]
    out["drift"] = torch.tensor(drift, dtype=torch.float64)
    return out


def in_memory(family, **config) -> dict[str, torch.Tensor]:
    base, experts, merged, data = setup(family)
    model = copy.deepcopy(merged)
    _, report = calibrate(
        model, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False, **config)
    )
    return _collect(family, model, report)


def streamed(family, tmp: Path) -> dict[str, torch.Tensor]:
    base, experts, merged, data = setup(family, dtype=torch.float32)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp, base, experts, merged)
    cfg = FeatCalConfig(progress=False, stream_placement="disk", offload_dir=str(tmp / "offload"))
    out, report = calibrate(
        merged_dir, base=base_dir, experts=expert_dirs, data=data, config=cfg, out=tmp / "out"
    )
    return _collect(family, type(merged).from_pretrained(out), report)


def cases(tmp: Path) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """Case name -> a function that runs it (streamed cases write under `tmp`)."""
    found: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    for family in IN_MEMORY:
        found[f"memory.{family.name}"] = lambda f=family: _maybe_registered(f, in_memory)
    found["memory.clip-vision.project"] = lambda: in_memory(CLIP_VISION, cross_method="project")
    found["memory.llama.cross.alpha1"] = lambda: in_memory(
        LLAMA, cross_method="cross", teacher_interp_alpha=1.0
    )
    found["memory.bert.no-bias-no-norm"] = lambda: in_memory(
        BERT, calibrate_bias=False, calibrate_layernorm=False
    )
    for family in STREAMED:
        found[f"streamed.{family.name}"] = lambda f=family: streamed(f, tmp / f.name)
    return found


def _maybe_registered(family, run):
    if family is TOY_KINDS:
        with registered(STACK_ADAPTER):
            return run(family)
    return run(family)


def main() -> None:
    """Write the pinned file: run only with the featcal whose results are to be pinned, and with
    --overwrite, as replacing the pins makes the test that reads them compare a run with itself."""
    import argparse
    import tempfile

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--overwrite", action="store_true", help="replace the pinned file")
    if PINNED.exists() and not parser.parse_args().overwrite:
        raise SystemExit(f"{PINNED} exists; pass --overwrite to replace it")

    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in cases(Path(tmp)).items():
            for key, value in run().items():
                tensors[f"{name}/{key}"] = value
            print(name, file=sys.stderr)
    PINNED.parent.mkdir(exist_ok=True)
    save_file(tensors, str(PINNED))


if __name__ == "__main__":
    main()
