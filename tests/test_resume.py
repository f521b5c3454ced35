"""An interrupted run goes on from its partial output, bit-identical to an uninterrupted run.

The killed runs are `featcal calibrate` subprocesses on a streamed 6-block Llama, stopped at a
chosen point by a SIGKILL or SIGTERM that the process sends itself (KILLER); the resumes check
the output against an uninterrupted run bit for bit, and the report's `resumed_from`.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from tiny_models import LLAMA, T5, make_data, make_experts, same_checkpoints, setup
from transformers import LlamaConfig, LlamaForCausalLM

from featcal import FeatCalConfig, FeatCalError, calibrate, task_arithmetic
from featcal.cli import main
from featcal.data import save_calibration_file
from featcal.io.lazy_checkpoint import LazyCheckpoint
from featcal.pipeline.fingerprint import LOCAL_SETTINGS
from featcal.pipeline.partial_output import MANIFEST_FILE, Manifest, partial_path

BLOCKS = 6

# argv: POINT COUNT SIGNAL SNAPSHOTS featcal-arguments...; the COUNTth time the run reaches POINT
# it is signalled. SNAPSHOTS: after which finished blocks stream snapshots are taken: "all",
# "none", "first" (the first block this run finishes).
KILLER = """
import os, signal, sys
import featcal.io.sharded_writer as writer
import featcal.pipeline.driver as driver
import featcal.pipeline.stage_inputs as stage_inputs
from featcal.cli import main
from featcal.pipeline.partial_output import PartialOutput
from featcal.pipeline.stream_snapshot import SnapshotPolicy

point, count, signum, snapshots = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]
calls = []
SnapshotPolicy.due = lambda self: snapshots == "all" or (snapshots == "first" and self.last_cost is None)

def hit():
    calls.append(1)
    if len(calls) == count:
        os.kill(os.getpid(), signum)

def after(owner, name):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        hit()
        return result
    setattr(owner, name, wrapped)

def before(owner, name):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        hit()
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)

def half_written(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    if not os.path.basename(filename).startswith(".model-"):  # a stream snapshot's file
        return
    if len(calls) + 1 == count:
        os.truncate(filename, os.path.getsize(filename) // 2)
    hit()

if point == "recorded":
    after(PartialOutput, "record")
elif point == "solve":
    before(driver, "solve")
elif point == "capture":
    before(stage_inputs, "capture_first_block_inputs")
elif point == "shard":
    real_save, writer.save_file = writer.save_file, half_written
elif point == "snapshot":
    import featcal.pipeline.stream_snapshot as stream_snapshot
    before(stream_snapshot, "save_tensors")
sys.exit(main(sys.argv[5:]))
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """base/, t0/, t1/, merged/ (Task Arithmetic) of a 6-block Llama, and a data file per task."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).eval()
    experts = dict(zip(("t0", "t1"), make_experts(base, 2).values()))
    base.save_pretrained(root / "base")
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    task_arithmetic(base, experts, 0.3).save_pretrained(root / "merged")
    gen = torch.Generator().manual_seed(3)
    for task in experts:
        ids = torch.randint(0, 100, (8, 12), generator=gen)
        save_calibration_file(
            root / f"{task}.safetensors", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )
    reference = root / "reference"
    assert main(_args(root, reference)) == 0
    return root, list(experts), reference


def _args(root, out, experts=("t0", "t1"), data=None, offload=None):
    data = data or {t: root / f"{t}.safetensors" for t in experts}
    args = ["calibrate", "--base", str(root / "base"), "--merged", str(root / "merged"), "--out", str(out)]
    args += ["--quiet", "--batch-size", "4", "--experts", *[f"{t}={root / t}" for t in experts]]
    args += ["--data", *[f"{t}={p}" for t, p in data.items()]]
    if offload is not None:
        args += ["--streams", "disk", "--offload-dir", str(offload)]
    return args


def _killed(
    point: str, count: int, signum: str, snapshots: str, args: list[str]
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILLER, point, str(count), signum, snapshots, *args]
    return subprocess.run(command, capture_output=True, text=True)


def _manifest(out) -> dict:
    return json.loads((partial_path(out) / MANIFEST_FILE).read_text())


def _finished(out) -> int:
    return len(_manifest(out)["finished"])


def _report(out) -> dict:
    return json.loads((out / "featcal_report.json").read_text())


def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_output(llama, tmp_path):
    root, _, reference = llama
    out, offload = tmp_path / "out", tmp_path / "offload"
    args = _args(root, out, offload=offload)

    run = _killed("recorded", 2, "SIGKILL", "first", args)  # just after block 1 is recorded
    assert run.returncode == -signal.SIGKILL and _finished(out) == 2
    assert _manifest(out)["snapshot"] == "featcal-snapshot-00001"  # the streams after block 0
    assert [p.name.startswith("featcal-streams-") for p in offload.iterdir()] == [True]  # left by the kill

    # Inside the resumed run's capture (the snapshot is read after it, block 1 replayed).
    run = _killed("capture", 3, "SIGKILL", "none", args + ["--resume"])
    assert run.returncode == -signal.SIGKILL and _finished(out) == 2
    assert len(list(offload.iterdir())) == 1  # the stale streams of the first kill were removed

    run = _killed("solve", 2, "SIGKILL", "none", args + ["--resume"])  # in block 3's solve
    assert run.returncode == -signal.SIGKILL and _finished(out) == 3
    assert _manifest(out)["snapshot"] == "featcal-snapshot-00001"

    run = _killed("shard", 2, "SIGKILL", "all", args + ["--resume"])  # block 4's shard half written
    assert run.returncode == -signal.SIGKILL and _finished(out) == 4
    assert any(p.name.endswith(".tmp") for p in partial_path(out).iterdir())
    assert _manifest(out)["snapshot"] == "featcal-snapshot-00004"
    assert [p.name for p in partial_path(out).glob("featcal-snapshot-*")] == ["featcal-snapshot-00004"]

    assert main(args + ["--resume"]) == 0
    assert same_checkpoints(out, reference)
    assert not partial_path(out).exists() and list(offload.iterdir()) == []
    resumed = _report(out)["resumed_from"]
    assert (resumed["stage"], resumed["block"], resumed["finished_before"]) == (None, 4, 4)
    assert resumed["restored_from_snapshot"] == 4
    assert [b["index"] for b in _report(out)["blocks"]] == list(range(BLOCKS))
    kept = [b["drift_calibrated"] for b in _report(out)["blocks"]]
    assert kept == [b["drift_calibrated"] for b in _report(reference)["blocks"]]


def test_sigterm_leaves_a_resumable_partial_output_and_says_how_to_go_on(llama, tmp_path):
    root, _, reference = llama
    out, offload = tmp_path / "out", tmp_path / "offload"
    args = _args(root, out, offload=offload)
    run = _killed("recorded", 3, "SIGTERM", "none", args)
    assert run.returncode == 143, run.stderr
    assert "featcal: stopped by SIGTERM: the run was abandoned cleanly" in run.stderr
    assert (
        f"{partial_path(out)} keeps the finished blocks (3 of 6 blocks finished, up to block 2)" in run.stderr
    )
    assert (
        "run the same command with --resume (without --overwrite) to go on" in run.stderr
        and "Traceback" not in run.stderr
    )
    assert list(offload.iterdir()) == [] and _finished(out) == 3

    assert main(args + ["--resume"]) == 0  # no snapshot: blocks 0-2 are replayed
    resumed = _report(out)["resumed_from"]
    assert (
        same_checkpoints(out, reference) and resumed["block"] == 3 and "restored_from_snapshot" not in resumed
    )


@pytest.fixture
def interrupted(llama, tmp_path, monkeypatch):
    """A partial output with blocks 0 and 1 finished: the run failed in block 2's solve."""
    import featcal.pipeline.driver as driver

    root, _, _ = llama
    out = tmp_path / "out"
    real = _fail_at(monkeypatch, driver, "solve", 3, "a failure in block 2's solve")
    with pytest.raises(FeatCalError, match="block 2's solve") as caught:
        calibrate(
            root / "merged",
            base=root / "base",
            experts={t: root / t for t in ("t0", "t1")},
            data=_data(root),
            config=FeatCalConfig(progress=False),
            out=out,
        )
    monkeypatch.setattr(driver, "solve", real)
    assert caught.value.__notes__ == [
        f"the partial output {partial_path(out)} keeps the finished blocks (2 of 6 blocks finished, up to "
        "block 1): run the same command with --resume (without --overwrite) to go on from there"
    ]
    return out


def _fail_at(monkeypatch, owner, name: str, call: int, message: str):
    """`owner.name` raises FeatCalError(message) on its `call`th call; the real one is returned."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise FeatCalError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return real


def _data(root, tasks=("t0", "t1")):
    from featcal.io.data_files import load_calibration_file

    return {t: load_calibration_file(root / f"{t}.safetensors", 4) for t in tasks}


def test_a_partial_output_is_reported_and_refused_without_resume(llama, interrupted, capsys):
    root, _, reference = llama
    assert main(_args(root, interrupted)) == 2
    err = capsys.readouterr().err
    assert (
        f"{partial_path(interrupted)} holds an interrupted run of this output (2 of 6 blocks finished" in err
    )
    assert "with --resume to go on from there, or with --overwrite to discard it" in err
    assert main(_args(root, interrupted) + ["--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err

    assert main(_args(root, interrupted) + ["--overwrite"]) == 0  # discards it and starts over
    assert same_checkpoints(interrupted, reference) and _report(interrupted)["resumed_from"] is None


def test_resume_is_refused_for_other_data_settings_or_experts(llama, interrupted, tmp_path, capsys):
    root, _, reference = llama
    other = tmp_path / "other.safetensors"
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(9))
    save_calibration_file(other, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    changed = tmp_path / "t1"
    shutil.copytree(root / "t1", changed)
    expert = LlamaForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        expert.model.layers[3].mlp.up_proj.weight.mul_(1.01)
    expert.save_pretrained(changed)

    cases = {
        "this run's calibration data of task 't1' is not the one its run was given": _args(
            root, interrupted, data={"t0": root / "t0.safetensors", "t1": other}
        ),
        "its run had lambda_ratio=0.05, this one has lambda_ratio=0.1": _args(root, interrupted)
        + ["--lambda-ratio", "0.1"],
        "this run's expert 't1' is not the one its run was given": [
            f"t1={changed}" if a == f"t1={root / 't1'}" else a for a in _args(root, interrupted)
        ],
    }
    for message, args in cases.items():
        assert main(args + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume from {partial_path(interrupted)}: {message}" in err, err
        assert "pass --overwrite instead of --resume" in err and _finished(interrupted) == 2

    assert main(_args(root, interrupted) + ["--resume"]) == 0
    assert same_checkpoints(interrupted, reference)


def test_a_damaged_partial_output_is_refused(llama, interrupted, capsys):
    root, _, _ = llama
    (partial_path(interrupted) / MANIFEST_FILE).write_text("{not json")
    assert main(_args(root, interrupted) + ["--resume"]) == 2
    assert "is not a resumable partial output (featcal_manifest.json:" in capsys.readouterr().err


def test_a_partial_output_of_a_live_run_is_left_alone(llama, interrupted, capsys):
    root, _, _ = llama
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from featcal.io.process_identity import ProcessIdentity

        manifest = json.loads((partial_path(interrupted) / MANIFEST_FILE).read_text())
        manifest["owner"] = ProcessIdentity.of(live.pid).to_dict()
        (partial_path(interrupted) / MANIFEST_FILE).write_text(json.dumps(manifest))
        assert main(_args(root, interrupted) + ["--overwrite"]) == 2
        assert f"is being written by a featcal run that is still going (process {live.pid}" in (
            capsys.readouterr().err
        )
    finally:
        live.kill()
        live.wait()


def test_t5_resumed_inside_the_decoder_replays_the_encoder(tmp_path, monkeypatch):
    """In memory (the partial output keeps one file per block); 2 encoder and 2 decoder blocks."""
    import featcal.pipeline.driver as driver

    base = T5.build(0).double()
    experts = make_experts(base, 2)
    merged = task_arithmetic(base, experts, 0.3)
    data = make_data(T5, list(experts))
    cfg = FeatCalConfig(progress=False)
    whole, whole_report = calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg)

    real = _fail_at(monkeypatch, driver, "solve", 4, "a failure in the decoder")  # decoder block 1
    out = tmp_path / "out"
    with pytest.raises(FeatCalError, match="in the decoder"):
        calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg, out=out)
    monkeypatch.setattr(driver, "solve", real)
    assert _finished(out) == 3

    model, report = calibrate(
        copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg, out=out, resume=True
    )
    assert report.resumed_from["stage"] == "t5-decoder" and report.resumed_from["block"] == 1
    want = whole.state_dict()
    assert all(torch.equal(value, want[key]) for key, value in model.state_dict().items())
    saved = LazyCheckpoint(out)
    assert not (out / "featcal-blocks").exists()
    assert all(torch.equal(t, want[k]) for k, t in saved.read([k for k in saved.keys() if k in want]).items())
    assert [b.drift_calibrated for b in report.blocks] == [b.drift_calibrated for b in whole_report.blocks]


def test_a_snapshot_that_cannot_be_written_only_costs_replay(llama, tmp_path, monkeypatch, caplog):
    import errno
    import os

    import featcal.io.sharded_writer as sharded_writer
    import featcal.pipeline.driver as driver

    root, _, reference = llama
    real_save = sharded_writer.save_file

    def full_for_snapshots(tensors, filename, metadata=None):
        if not os.path.basename(filename).startswith(".model-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(sharded_writer, "save_file", full_for_snapshots)
    real_solve = _fail_at(monkeypatch, driver, "solve", 4, "a failure in block 3")
    out = tmp_path / "out"
    models = dict(base=root / "base", experts={t: root / t for t in ("t0", "t1")}, data=_data(root))
    cfg = FeatCalConfig(progress=False)
    with caplog.at_level("WARNING", logger="featcal"), pytest.raises(FeatCalError, match="block 3"):
        calibrate(root / "merged", **models, config=cfg, out=out)
    assert "no stream snapshot after 1 blocks (a resumed run replays more)" in caplog.text
    assert _finished(out) == 3 and _manifest(out)["snapshot"] is None
    assert not list(partial_path(out).glob("featcal-snapshot-*"))

    monkeypatch.setattr(driver, "solve", real_solve)
    _, report = calibrate(root / "merged", **models, config=cfg, out=out, resume=True)
    assert report.resumed_from["block"] == 3 and "restored_from_snapshot" not in report.resumed_from
    assert same_checkpoints(out, reference)


@pytest.mark.parametrize("family, stop", [(LLAMA, "solve"), (LLAMA, "saving"), (T5, "saving")])
def test_a_resumed_module_gets_every_calibrated_block(tmp_path, monkeypatch, family, stop):
    """In memory: stopped in block 1 (block 0 comes back from the stream snapshot, not replayed),
    or while saving after the last block (nothing is replayed; T5: in both stages); the module
    returned and the output saved equal an uninterrupted run's either way."""
    import featcal.io.block_files as block_files
    import featcal.pipeline.driver as driver

    base, experts, merged, data = setup(family, tasks=2)
    cfg = FeatCalConfig(progress=False)
    whole, _ = calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg)

    owner, name = (driver, "solve") if stop == "solve" else (block_files.ModuleOutput, "finish")
    real = _fail_at(monkeypatch, owner, name, 1 if stop == "saving" else 2, "stopped")
    out = tmp_path / "out"
    with pytest.raises(FeatCalError, match="stopped"):
        calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg, out=out)
    monkeypatch.setattr(owner, name, real)
    total = 4 if family is T5 else 2
    assert _finished(out) == (1 if stop == "solve" else total)

    model, report = calibrate(
        copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg, out=out, resume=True
    )
    if stop == "solve":
        assert report.resumed_from["restored_from_snapshot"] == 1 and report.resumed_from["block"] == 1
    else:
        assert report.resumed_from["block"] is None and report.resumed_from["finished_before"] == total
    want = whole.state_dict()
    assert all(torch.equal(value, want[key]) for key, value in model.state_dict().items())
    saved = LazyCheckpoint(out)
    assert all(torch.equal(t, want[k]) for k, t in saved.read([k for k in saved.keys() if k in want]).items())


def test_a_kill_inside_a_snapshot_write_then_resume(llama, tmp_path):
    """The half-written snapshot (a temporary directory) is removed; the previous one is used."""
    root, _, reference = llama
    out = tmp_path / "out"
    args = _args(root, out)
    run = _killed("snapshot", 13, "SIGKILL", "all", args)  # 10 files a snapshot: inside the second
    assert run.returncode == -signal.SIGKILL and _finished(out) == 1
    assert any(p.name.endswith(".tmp") and p.is_dir() for p in partial_path(out).iterdir())
    assert main(args + ["--resume"]) == 0
    assert same_checkpoints(out, reference) and _report(out)["resumed_from"]["restored_from_snapshot"] == 1
    assert not any(p.name.startswith((".", "featcal-")) for p in out.iterdir())


def test_a_stop_while_completing_leaves_a_resumable_partial_output(llama, tmp_path, monkeypatch):
    import featcal.pipeline.partial_output as partial_output

    root, _, reference = llama
    out, real = tmp_path / "out", partial_output.sync_tree

    def stopped(directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(partial_output, "sync_tree", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(_args(root, out))
    monkeypatch.setattr(partial_output, "sync_tree", real)
    assert _finished(out) == BLOCKS
    assert main(_args(root, out) + ["--resume"]) == 0
    assert same_checkpoints(out, reference) and _report(out)["resumed_from"]["block"] is None


def test_a_run_begun_with_overwrite_is_resumed_with_resume(llama, tmp_path, monkeypatch):
    import featcal.pipeline.driver as driver

    root, _, reference = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier output")
    real = _fail_at(monkeypatch, driver, "solve", 3, "a failure in block 2")
    assert main(_args(root, out) + ["--overwrite"]) == 2
    monkeypatch.setattr(driver, "solve", real)
    assert (out / "old.txt").exists() and _finished(out) == 2
    assert main(_args(root, out) + ["--resume"]) == 0
    assert same_checkpoints(out, reference) and not (out / "old.txt").exists()


def test_blocks_stored_narrower_than_they_are_calibrated_resume_exactly(llama, tmp_path, monkeypatch):
    """A merged checkpoint whose MLP weights are bfloat16, the rest float32: blocks run in float32
    and are stored rounded, so the partial output keeps their exact values for the replay."""
    from safetensors.torch import load_file, save_file

    import featcal.pipeline.driver as driver
    from featcal.pipeline.stream_snapshot import SnapshotPolicy

    root, experts, _ = llama
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "merged", mixed)
    tensors = load_file(mixed / "model.safetensors")
    tensors = {k: v.to(torch.bfloat16) if ".mlp." in k else v for k, v in tensors.items()}
    save_file(tensors, mixed / "model.safetensors", metadata={"format": "pt"})
    models = dict(base=root / "base", experts={t: root / t for t in experts}, data=_data(root))
    cfg = FeatCalConfig(progress=False)
    whole, _ = calibrate(mixed, **models, config=cfg, out=tmp_path / "whole")

    monkeypatch.setattr(SnapshotPolicy, "due", lambda self: False)  # block 0 and 1 are replayed
    real = _fail_at(monkeypatch, driver, "solve", 3, "a failure in block 2")
    with pytest.raises(FeatCalError, match="block 2"):
        calibrate(mixed, **models, config=cfg, out=tmp_path / "out")
    monkeypatch.setattr(driver, "solve", real)
    assert len(list((partial_path(tmp_path / "out") / "featcal-exact-blocks").iterdir())) == 2
    resumed, report = calibrate(mixed, **models, config=cfg, out=tmp_path / "out", resume=True)
    assert report.resumed_from["block"] == 2 and same_checkpoints(resumed, whole)
    assert not (resumed / "featcal-exact-blocks").exists()


def test_resuming_elsewhere_warns(llama, interrupted, caplog):
    """Another host's partial output is taken over, and other numerics are not bit-identical:
    both are said."""
    root, _, reference = llama
    manifest = _manifest(interrupted)
    manifest["owner"]["host"] = "another-host"
    manifest["numerics"]["torch"] = "0.0"
    (partial_path(interrupted) / MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="featcal"):
        assert main(_args(root, interrupted) + ["--resume"]) == 0
    assert (
        "was written by process" in caplog.text
        and "on another-host: make sure that run has stopped" in caplog.text
    )
    assert "with torch '" in caplog.text and "where its run had '0.0'" in caplog.text
    assert same_checkpoints(interrupted, reference)  # the same torch in truth


def test_a_damaged_snapshot_costs_only_replay(llama, interrupted, caplog):
    root, _, reference = llama
    snapshot = partial_path(interrupted) / _manifest(interrupted)["snapshot"]
    for file in snapshot.iterdir():
        file.write_bytes(b"")
    with caplog.at_level("WARNING", logger="featcal"):
        assert main(_args(root, interrupted) + ["--resume"]) == 0
    assert f"the stream snapshot {snapshot} of the partial output cannot be read" in caplog.text
    assert "the finished blocks are replayed instead" in caplog.text
    assert same_checkpoints(interrupted, reference)
    assert "restored_from_snapshot" not in _report(interrupted)["resumed_from"]


def test_a_setting_added_since_the_manifest_counts_as_its_default():
    """A partial output written before `sequential` existed resumes as sequential="off" only."""
    settings = {k: v for k, v in FeatCalConfig().to_dict().items() if k not in LOCAL_SETTINGS}
    old = Manifest("0", {k: v for k, v in settings.items() if k != "sequential"}, ["t"], {}, [2])
    assert old.mismatch(Manifest("0", settings, ["t"], {}, [2])) is None
    grouped = Manifest("0", {**settings, "sequential": "group"}, ["t"], {}, [2])
    assert old.mismatch(grouped) == "its run had sequential='off', this one has sequential='group'"


def test_a_renamed_setting_is_read_in_its_new_name():
    """allow_tf32 (before float32_precision existed) resumes as "ieee" (False) or "tf32" (True)."""
    settings = {k: v for k, v in FeatCalConfig().to_dict().items() if k not in LOCAL_SETTINGS}
    before = {k: v for k, v in settings.items() if k != "float32_precision"}
    for old_value, new_value in ((False, "ieee"), (True, "tf32")):
        old = Manifest("0", {**before, "allow_tf32": old_value}, ["t"], {}, [2])
        now = Manifest("0", {**settings, "float32_precision": new_value}, ["t"], {}, [2])
        assert old.mismatch(now) is None
    old = Manifest("0", {**before, "allow_tf32": True}, ["t"], {}, [2])
    assert old.mismatch(Manifest("0", settings, ["t"], {}, [2])) == (
        "its run had float32_precision='tf32', this one has float32_precision='ieee'"
    )
