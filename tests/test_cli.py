"""The featcal command end to end on tiny checkpoints saved to disk."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from tiny_models import CLIP_VISION, make_data, make_experts, same_checkpoints
from transformers import CLIPVisionModel

from featcal import FeatCalConfig, calibrate, task_arithmetic, ties_merging
from featcal.cli import main
from featcal.data import save_calibration_file
from featcal.io.lazy_checkpoint import LazyCheckpoint


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """base/, expert dirs, data files, and the in-memory models they hold."""
    root = tmp_path_factory.mktemp("ckpt")
    base = CLIP_VISION.build(0)
    experts = make_experts(base, 2)
    base.save_pretrained(root / "base")
    (root / "base" / "preprocessor_config.json").write_text('{"size": 32}')
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    data = make_data(CLIP_VISION, list(experts), batches=2, size=4)
    for task, batches in data.items():
        save_calibration_file(
            root / f"{task}.safetensors", {"pixel_values": torch.cat([b["pixel_values"] for b in batches])}
        )
    return root, base, experts, data


def _expert_args(root, experts):
    return [f"{t}={root / t}" for t in experts]


def _weights(path):
    checkpoint = LazyCheckpoint(path)
    return checkpoint.read(checkpoint.keys())


@pytest.mark.parametrize("method", ["ta", "ties"])
def test_merge_matches_python(disk, tmp_path, method):
    root, base, experts, _ = disk
    out = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--method",
                method,
                "--base",
                str(root / "base"),
                "--out",
                str(out),
                "--experts",
                *_expert_args(root, experts),
            ]
        )
        == 0
    )
    want = task_arithmetic(base, experts, 0.3) if method == "ta" else ties_merging(base, experts)
    got = _weights(out)
    for key, value in want.state_dict().items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_calibrate_writes_checkpoint_and_report(disk, tmp_path, capsys):
    root, base, experts, data = disk
    merged_dir = tmp_path / "merged"
    task_arithmetic(base, experts, 0.3).save_pretrained(merged_dir)
    out = tmp_path / "out"
    args = [
        "calibrate",
        "--base",
        str(root / "base"),
        "--merged",
        str(merged_dir),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--quiet",
    ]
    args += [
        "--experts",
        *_expert_args(root, experts),
        "--data",
        *[f"{t}={root / t}.safetensors" for t in experts],
    ]
    assert main(args + ["--report", str(tmp_path / "extra.json")]) == 0
    printed = capsys.readouterr()
    assert "drift merged" in printed.out and f"wrote {out}" in printed.out
    assert "featcal: blocks" not in printed.err  # --quiet: no progress bars

    report = json.loads((out / "featcal_report.json").read_text())
    assert len(report["blocks"]) == 3 and report["wall_seconds"] > 0 and report["peak_cpu_rss_bytes"] > 0
    assert json.loads((tmp_path / "extra.json").read_text())["blocks"] == report["blocks"]

    merged = CLIPVisionModel.from_pretrained(merged_dir)
    calibrate(merged, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False))
    saved = CLIPVisionModel.from_pretrained(out)
    for (name, want), got in zip(merged.state_dict().items(), saved.state_dict().values()):
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name  # same run, up to BLAS rounding
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def _calibrate_args(root, experts, merged, out, data=None):
    data = data or {t: root / f"{t}.safetensors" for t in experts}
    args = ["calibrate", "--base", str(root / "base"), "--merged", str(merged), "--out", str(out), "--quiet"]
    return args + [
        "--experts",
        *_expert_args(root, experts),
        "--data",
        *[f"{t}={p}" for t, p in data.items()],
    ]


def test_existing_output_is_refused_unless_overwrite(disk, tmp_path, capsys):
    root, base, experts, _ = disk
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = _calibrate_args(root, experts, root / "base", out)
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and not (out / "keep.txt").exists()


def test_bad_paths_and_tasks_are_named(disk, tmp_path, capsys):
    root, base, experts, _ = disk
    out = tmp_path / "out"
    assert main(_calibrate_args(root, experts, tmp_path / "nowhere", out)) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert (
        main(
            _calibrate_args(
                root,
                experts,
                root / "base",
                out,
                data={"task0": tmp_path / "x.safetensors", "task1": root / "task1.safetensors"},
            )
        )
        == 2
    )
    assert "no such data file" in capsys.readouterr().err
    assert (
        main(_calibrate_args(root, experts, root / "base", out, data={"task0": root / "task0.safetensors"}))
        == 2
    )
    assert "tasks ['task1'] have an expert but no calibration data" in capsys.readouterr().err
    assert main(["merge", "--base", str(root / "base"), "--out", str(out), "--experts", "task0"]) == 2
    assert "task=VALUE" in capsys.readouterr().err
    assert not out.exists()


def test_failed_run_leaves_no_output(disk, tmp_path, capsys):
    root, base, experts, data = disk
    poisoned = copy.deepcopy(data["task1"])
    poisoned[0]["pixel_values"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_calibration_file(bad, {"pixel_values": torch.cat([b["pixel_values"] for b in poisoned])})
    out = tmp_path / "out"
    code = main(
        _calibrate_args(
            root, experts, root / "base", out, data={"task0": root / "task0.safetensors", "task1": bad}
        )
    )
    assert code == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "featcal", "calibrate", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--lambda-ratio" in proc.stdout


def test_memory_flags_place_streams_and_refuse_a_short_budget(disk, tmp_path, capsys):
    root, base, experts, _ = disk
    merged_dir = tmp_path / "merged"
    task_arithmetic(base, experts, 0.3).save_pretrained(merged_dir)
    out = tmp_path / "out"
    args = _calibrate_args(root, experts, merged_dir, out)
    assert main(args + ["--max-cpu-memory", "1KB"]) == 2
    assert "does not fit the memory budget (1000 B of memory" in capsys.readouterr().err
    assert not out.exists()

    offload = tmp_path / "offload"
    assert main(args + ["--streams", "disk", "--offload-dir", str(offload), "--max-cpu-memory", "4GiB"]) == 0
    report = json.loads((out / "featcal_report.json").read_text())
    assert report["memory_plan"]["placement"] == "disk" and report["config"]["max_cpu_memory"] == "4GiB"
    assert offload.is_dir() and not list(offload.iterdir())


def test_a_full_disk_while_writing_the_output_is_a_clear_error(disk, tmp_path, capsys, monkeypatch):
    import errno

    import featcal.io.sharded_writer as sharded_writer

    root, base, experts, data = disk
    real, calls = sharded_writer.save_file, []

    def filling(tensors, filename, metadata=None):
        if os.path.basename(filename).startswith(".model-"):  # not a stream snapshot's file
            calls.append(filename)
        if len(calls) == 3 and calls[-1] == filename:  # the second block's shard
            real(tensors, filename, metadata=metadata)  # a part of it is on disk when the room runs out
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(sharded_writer, "save_file", filling)
    out = tmp_path / "out"
    args = _calibrate_args(root, experts, root / "base", out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "featcal: error: could not write " in err and "No space left on device" in err
    assert "1 of 3 blocks finished, up to block 0): run the same command with --resume" in err
    assert "Traceback" not in err
    partial = tmp_path / "out.featcal-partial"
    assert [p.name for p in tmp_path.iterdir()] == [partial.name]
    assert not [p for p in partial.iterdir() if p.name.endswith(".tmp")]  # no half-written shard

    monkeypatch.setattr(sharded_writer, "save_file", real)
    assert main(args + ["--resume"]) == 0
    assert main(_calibrate_args(root, experts, root / "base", tmp_path / "whole")) == 0
    assert same_checkpoints(out, tmp_path / "whole")
    report = json.loads((out / "featcal_report.json").read_text())
    assert report["resumed_from"]["block"] == 1 and report["resumed_from"]["finished_before"] == 1


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly(disk, tmp_path, capsys, monkeypatch, signum, status):
    import featcal.pipeline.driver as driver

    root, base, experts, data = disk
    real = driver._calibrate_block

    def signalled(run, *args, **kwargs):
        if run.index == 1:
            os.kill(os.getpid(), signum)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(driver, "_calibrate_block", signalled)
    out, offload = tmp_path / "out", tmp_path / "offload"
    args = _calibrate_args(root, experts, root / "base", out) + [
        "--streams",
        "disk",
        "--offload-dir",
        str(offload),
    ]
    assert main(args) == status
    err = capsys.readouterr().err
    assert f"featcal: stopped by {signal.Signals(signum).name}: the run was abandoned cleanly" in err
    assert f"{out}.featcal-partial keeps the finished blocks (1 of 3 blocks finished" in err
    assert "run the same command with --resume (without --overwrite) to go on" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload", "out.featcal-partial"]
    assert list(offload.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
