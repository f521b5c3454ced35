"""Runs of featcal over several gloo processes, and the single-process runs they must equal.

`run_world(world, cases, root)` starts `world` processes (torch.multiprocessing, spawn); each
joins a gloo group (file rendezvous under `root`), runs the named cases in order, and writes per
case its calibrated block parameters and drift (`<case>.rank<r>.safetensors`) or its error
(`<case>.rank<r>.json`). `single(case, root)` runs a case in this process alone. Cases build
their models and data from fixed seeds, so every process builds the same ones; three tasks of
1, 3 and 2 batches make the work split a task over processes.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tiny_models import CLIP_VISION, LLAMA, MIXTRAL, T5, save_checkpoints, setup

from featcal import FeatCalConfig, FeatCalError, calibrate

BATCHES = (1, 3, 2)  # per task: unequal, so that a task is split over processes
FAMILIES = {"clip": CLIP_VISION, "llama": LLAMA, "t5": T5, "mixtral": MIXTRAL}


def _inputs(family, dtype, batches=BATCHES):
    base, experts, merged, _ = setup(family, tasks=len(batches), dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    data = {t: [family.make_batch(gen, 4) for _ in range(n)] for t, n in zip(experts, batches)}
    if dtype != torch.float64:
        data = {t: [_cast(b, dtype) for b in batches] for t, batches in data.items()}
    return base, experts, merged, data


def _cast(batch: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def _blocks(family, model) -> list:
    return [*model.encoder.block, *model.decoder.block] if family is T5 else list(family.blocks(model))


def _result(family, model, report) -> dict[str, torch.Tensor]:
    out = {
        f"block{i}.{name}": value.detach().clone().contiguous()
        for i, block in enumerate(_blocks(family, model))
        for name, value in block.state_dict().items()
    }
    out["drift"] = torch.tensor(
        [(b.drift_merged, b.drift_calibrated) for b in report.blocks], dtype=torch.float64
    )
    low = [(b.index, name, n) for b in report.blocks for name, n in sorted(b.low_coverage_experts.items())]
    if low:  # routed experts left merged: (block, expert slot, part, tokens)
        out["low_coverage"] = torch.tensor(
            [(i, int(name[-2]), "down" in name, n) for i, name, n in low], dtype=torch.float64
        )
    return out


def in_memory(name: str, dtype, batches=BATCHES, **config):
    def case(root: Path, rank: int, distributed: str):
        family = FAMILIES[name]
        base, experts, merged, data = _inputs(family, dtype, batches)
        model = copy.deepcopy(merged)
        cfg = FeatCalConfig(progress=False, distributed=distributed, **config)
        _, report = calibrate(model, base=base, experts=experts, data=data, config=cfg)
        return _result(family, model, report), report

    return case


def write_checkpoints(root: Path) -> None:
    """The streamed case's models as sharded safetensors directories under `root`."""
    base, experts, merged, _ = _inputs(LLAMA, torch.float32)
    save_checkpoints(root, base, experts, merged)


def streamed(root: Path, rank: int, distributed: str):
    """Llama, experts as checkpoint directories, the merged model streamed from disk to `out`."""
    _, experts, merged, data = _inputs(LLAMA, torch.float32)
    out = root / f"out-{distributed}"
    cfg = FeatCalConfig(
        progress=False,
        distributed=distributed,
        stream_placement="disk",
        offload_dir=str(root / f"offload{rank}"),
    )
    path, report = calibrate(
        root / "merged",
        base=root / "base",
        experts={t: root / t for t in experts},
        data=data,
        config=cfg,
        out=out,
    )
    return _result(LLAMA, type(merged).from_pretrained(path), report), report


def streamed_resumed(root: Path, rank: int, distributed: str):
    """`streamed`, stopped by a failure on the last process in block 1 (of 2), then resumed."""
    import featcal.pipeline.driver as driver

    _, experts, merged, data = _inputs(LLAMA, torch.float32)
    measure, out = driver.measure_calibrated, root / f"out-resumed-{distributed}"

    def failing(run, *args, **kwargs):
        if run.index == 1 and rank == dist.get_world_size() - 1:
            raise FeatCalError("a failure in block 1")
        return measure(run, *args, **kwargs)

    driver.measure_calibrated = failing
    models = {"base": root / "base", "experts": {t: root / t for t in experts}, "data": data}
    cfg = FeatCalConfig(progress=False, distributed=distributed)
    try:
        calibrate(root / "merged", **models, config=cfg, out=out)
    except FeatCalError as err:
        assert "a failure in block 1" in str(err), err
    finally:
        driver.measure_calibrated = measure
    path, report = calibrate(root / "merged", **models, config=cfg, out=out, resume=True)
    assert report.resumed_from["block"] == 1, report.resumed_from
    return _result(LLAMA, type(merged).from_pretrained(path), report), report


def nan_in_last_task(root: Path, rank: int, distributed: str):
    """Every process is given the same data, with a NaN in the last task's batch (another process's)."""
    base, experts, merged, data = _inputs(CLIP_VISION, torch.float64)
    last = list(data)[-1]
    data[last][-1]["pixel_values"][0, 0, 0, 0] = float("nan")
    cfg = FeatCalConfig(progress=False, distributed=distributed)
    calibrate(merged, base=base, experts=experts, data=data, config=cfg, out=root / "out-nan")
    return {}, None


def other_data_on_rank_1(root: Path, rank: int, distributed: str):
    base, experts, merged, data = _inputs(CLIP_VISION, torch.float64)
    if rank == 1:
        data["task1"][0]["pixel_values"] += 1
    cfg = FeatCalConfig(progress=False, distributed=distributed)
    calibrate(merged, base=base, experts=experts, data=data, config=cfg, out=root / "out-other")
    return {}, None


def rank_1_dies(root: Path, rank: int, distributed: str):
    """Process 1 exits without a word in the middle of its first block."""
    import featcal.pipeline.driver as driver

    accumulate = driver.accumulate

    def dying(*args, **kwargs):
        if rank == 1:
            os._exit(3)
        return accumulate(*args, **kwargs)

    driver.accumulate = dying
    base, experts, merged, data = _inputs(CLIP_VISION, torch.float64)
    cfg = FeatCalConfig(progress=False, distributed=distributed, distributed_timeout=30)
    calibrate(merged, base=base, experts=experts, data=data, config=cfg)
    return {}, None


def expert_unreadable_on_rank_1(root: Path, rank: int, distributed: str):
    """Process 1 cannot read its expert's block 1 (a damaged file on its node, say)."""
    from featcal.models.sources import ModelSource

    read = ModelSource.block

    def block(self, stage, index, device):
        if rank == 1 and self.role == "expert 'task2'" and index == 1:
            raise OSError(f"cannot read block {index} of the {self.role}")
        return read(self, stage, index, device)

    ModelSource.block = block
    try:
        base, experts, merged, data = _inputs(CLIP_VISION, torch.float64)
        cfg = FeatCalConfig(progress=False, distributed=distributed, distributed_timeout=30)
        calibrate(merged, base=base, experts=experts, data=data, config=cfg)
    finally:
        ModelSource.block = read
    return {}, None


CASES = {
    "clip64": in_memory("clip", torch.float64),
    "clip32": in_memory("clip", torch.float32),
    "llama64": in_memory("llama", torch.float64),
    "t5_64": in_memory("t5", torch.float64),
    # routed experts solved by different owners; some under the token threshold
    "mixtral64": in_memory("mixtral", torch.float64, min_expert_tokens=90),
    "clip64_project": in_memory("clip", torch.float64, cross_method="project", calibrate_bias=False),
    "llama64_group": in_memory("llama", torch.float64, sequential="group"),
    "t5_64_sublayer": in_memory("t5", torch.float64, sequential="sublayer"),
    "idle": in_memory("llama", torch.float64, batches=(1, 1)),  # with 3 processes, rank 1 idles
    "first_idle": in_memory("clip", torch.float64, batches=(1,)),  # rank 0 idles
    "idle_sublayer": in_memory("llama", torch.float64, batches=(1, 1), sequential="sublayer"),
    "streamed": streamed,
    "streamed_resumed": streamed_resumed,
    "nan": nan_in_last_task,
    "other_data": other_data_on_rank_1,
    "dies": rank_1_dies,
    "unreadable": expert_unreadable_on_rank_1,
}


def single(case: str, root: Path) -> dict[str, torch.Tensor]:
    """The case run by this process alone."""
    return CASES[case](root, 0, "off")[0]


def _worker(rank: int, world: int, cases: list[str], root: str, bucket: int | None) -> None:
    torch.set_num_threads(1)
    if bucket is not None:  # tensors of `bucket` elements or more travel alone (the path of large models)
        import featcal.pipeline.distributed as distributed

        distributed.BUCKET_ELEMENTS = bucket
    root_path = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root_path / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for case in cases:
            stem = root_path / f"{case}.rank{rank}"
            try:
                result, report = CASES[case](root_path, rank, "on")
            except FeatCalError as err:
                Path(f"{stem}.json").write_text(json.dumps({"error": str(err)}))
                continue
            except Exception:
                Path(f"{stem}.json").write_text(json.dumps({"crash": traceback.format_exc()}))
                raise
            save_file(result, str(stem) + ".safetensors")
            summary = {"distributed": None if report.distributed is None else report.distributed.__dict__}
            summary["tasks"] = report.tasks
            Path(f"{stem}.json").write_text(json.dumps(summary, default=str))
    finally:
        dist.destroy_process_group()


def run_world(
    world: int, cases: list[str], root: Path, timeout: float = 150, bucket: int | None = None
) -> list[int]:
    """Start the processes, wait for them; their exit codes. `bucket`: the size from which a
    tensor travels alone instead of coalesced (default: featcal's)."""
    context = mp.get_context("spawn")
    sys.stdout.flush()
    args = [(r, world, cases, str(root), bucket) for r in range(world)]
    processes = [context.Process(target=_worker, args=a) for a in args]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
    for p in processes:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in processes]


def outcome(root: Path, case: str, rank: int) -> tuple[dict | None, dict]:
    """A process's tensors (None after an error) and its JSON summary or error."""
    stem = root / f"{case}.rank{rank}"
    summary = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").exists() else {}
    tensors = Path(str(stem) + ".safetensors")
    return (load_file(tensors) if tensors.exists() else None), summary
