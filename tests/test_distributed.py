"""featcal over 2 and 3 gloo processes equals featcal in one process (docs/algorithm.md s.10).

Three tasks of 1, 3 and 2 batches: with 2 processes task1 is split 2 + 1 batches over ranks 0
and 1, with 3 processes 1 + 2 over ranks 0 and 1. CLIP (LayerNorm affines, class-token focus),
Llama (padding), T5 (two stages), in float64 and float32, with sequential statistics, in
memory and streamed from checkpoint directories to an output written by rank 0. A NaN in
another process's task, other data on one process, and a process that dies stop every process
with one clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_cases import BATCHES, _inputs, outcome, run_world, single, write_checkpoints
from safetensors.torch import load_file
from tiny_models import LLAMA, same_checkpoints

from featcal.cli import main
from featcal.io.data_files import save_calibration_file

ALL = [
    "clip64",
    "clip32",
    "llama64",
    "t5_64",
    "mixtral64",
    "clip64_project",
    "llama64_group",
    "t5_64_sublayer",
    "idle",
    "first_idle",
    "idle_sublayer",
    "streamed",
]
RESUMED = ["streamed_resumed"]
FAILING = ["nan", "other_data", "unreadable"]
TOLERANCE = {"clip32": 1e-5, "streamed": 1e-5}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world size -> the directory its processes wrote their results into."""
    roots = {}
    # With 3 processes every tensor of 64 elements or more travels alone, bands of A included.
    for world, cases, bucket in ((2, ALL + RESUMED + FAILING, None), (3, ALL + RESUMED, 64)):
        root = tmp_path_factory.mktemp(f"world{world}")
        write_checkpoints(root)
        assert run_world(world, cases, root, bucket=bucket) == [0] * world
        roots[world] = root
    return roots


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    write_checkpoints(root)
    return {case: single(case, root) for case in ALL}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ALL)
def test_every_process_returns_the_single_process_model(worlds, references, world, case):
    expected = references[case]
    for rank in range(world):
        got, summary = outcome(worlds[world], case, rank)
        assert got is not None, summary
        assert set(got) == set(expected)
        for name, value in expected.items():
            err = (got[name].double() - value.double()).abs().max().item()
            assert err <= TOLERANCE.get(case, 1e-10), (rank, name, err)


@pytest.mark.parametrize("world", [2, 3])
def test_tasks_are_spread_and_one_is_split(worlds, world):
    _, summary = outcome(worlds[world], "clip64", 0)
    report = summary["distributed"]
    assert report["world_size"] == world and report["backend"] == "gloo"
    ranks = report["ranks"]
    holders = [r["rank"] for r in ranks if "task1" in r["tasks"]]
    assert holders == [0, 1]  # task1's batches are split over two processes
    assert sum(r["batches"] for r in ranks) == sum(BATCHES)
    assert all(r["communication_seconds"] >= 0 for r in ranks)
    assert summary["tasks"]["task1"]["batches"] == 3


def test_a_process_without_batches_still_takes_part(worlds):
    _, summary = outcome(worlds[3], "idle", 0)
    assert [r["batches"] for r in summary["distributed"]["ranks"]] == [1, 0, 1]
    _, summary = outcome(worlds[2], "first_idle", 0)
    assert [r["batches"] for r in summary["distributed"]["ranks"]] == [0, 1]


def test_streamed_output_is_written_once_and_whole(worlds):
    root = worlds[2]
    assert (root / "out-on" / "featcal_report.json").is_file()
    assert not list(root.glob(".*partial*"))


def test_a_resumed_run_equals_the_uninterrupted_one(worlds):
    """A failure on the last process in block 1 stops the run; resumed over the same processes
    (the blocks kept come from process 0's partial output), the output is bit-identical."""
    for world, root in worlds.items():
        assert same_checkpoints(root / "out-on", root / "out-resumed-on")
        for rank in range(world):
            assert outcome(root, "streamed_resumed", rank)[0] is not None


def test_a_nan_on_another_process_stops_every_process(worlds):
    root = worlds[2]
    errors = [outcome(root, "nan", r)[1]["error"] for r in range(2)]
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 1 of 2 failed: NaN or Inf")
    assert "task 'task2', block 0" in errors[0]
    assert not (root / "out-nan").exists() and not list(root.glob(".out-nan*"))


def test_a_process_with_other_data_is_refused_before_any_work(worlds):
    root = worlds[2]
    for rank in range(2):
        error = outcome(root, "other_data", rank)[1]["error"]
        assert "rank 1 of 2 was given other calibration data of task 'task1' than rank 0" in error
    assert not (root / "out-other").exists()


def test_an_expert_block_unreadable_on_one_process_stops_every_process(worlds):
    errors = [outcome(worlds[2], "unreadable", r)[1]["error"] for r in range(2)]
    assert errors[0] == errors[1] == "rank 1 of 2 failed: OSError: cannot read block 1 of the expert 'task2'"


def test_a_process_that_dies_is_named_by_the_waiting_phase(tmp_path):
    codes = run_world(2, ["dies"], tmp_path)
    assert codes == [0, 3]
    error = outcome(tmp_path, "dies", 0)[1]["error"]
    assert error.startswith("rank 0 of 2: ") and "block 0" in error and "collective failed" in error


def test_torchrun_cli_equals_the_single_process_cli(tmp_path):
    write_checkpoints(tmp_path)
    _, experts, _, data = _inputs(LLAMA, torch.float32)
    args = ["calibrate", "--base", str(tmp_path / "base"), "--merged", str(tmp_path / "merged"), "--quiet"]
    args += ["--batch-size", "4", "--experts", *[f"{t}={tmp_path / t}" for t in experts], "--data"]
    for task, batches in data.items():
        path = tmp_path / f"{task}.safetensors"
        save_calibration_file(path, {k: torch.cat([b[k] for b in batches]) for k in batches[0]})
        args.append(f"{task}={path}")
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    run = _torchrun(2, [*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # process 0 alone prints the summary
    again = _torchrun(2, [*args, "--out", str(tmp_path / "two")])  # refused by every process, said once
    assert again.returncode != 0
    assert again.stderr.count("featcal: error:") == 1 and "exists; pass --overwrite" in again.stderr, (
        again.stderr[-2000:]
    )
    report = json.loads((tmp_path / "two" / "featcal_report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["backend"] == "gloo"
    single_weights, two = _weights(tmp_path / "single"), _weights(tmp_path / "two")
    assert set(single_weights) == set(two)
    for name, value in single_weights.items():
        assert (two[name] - value).abs().max().item() <= 1e-5, name


def _torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m featcal ARGS`, one thread per process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launch, "-m", "featcal", *args], env=env, capture_output=True, text=True, timeout=240
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out
