"""`featcal demo`: the digits benchmark, the model cache, and the quick demo end to end."""

import json
import logging

import pytest
import torch

from featcal import FeatCalConfig
from featcal.cli import main
from featcal.demo import QUICK_RECIPE, DemoConfig, Recipe
from featcal.demo.benchmark import (
    TASKS,
    calibration_inputs,
    load_digits_split,
    select_tasks,
    task_inputs,
    translate,
    validation_inputs,
)
from featcal.demo.cache import cache_file, flat_state, load_models, load_or_train
from featcal.demo.tuning import GRID, coordinate_sweep
from featcal.errors import FeatCalError
from featcal.io.user_cache import user_cache_dir

# One encoder block, two tasks, one epoch each: for the cache tests, in a couple of seconds.
TINY = Recipe(
    tasks=("digits", "parity"),
    hidden_size=16,
    layers=1,
    attention_heads=2,
    pretrain_epochs=1,
    finetune_epochs=1,
    test_size=100,
)


@pytest.fixture(scope="module")
def split():
    return load_digits_split(test_size=500, seed=0)


def test_split_is_disjoint_and_complete(split):
    assert len(split.train_images) + len(split.test_images) == 1797
    train = {tuple(x.flatten().tolist()) for x in split.train_images}
    # scikit-learn's digits hold a few duplicate images; nearly all test images are new
    unseen = sum(tuple(x.flatten().tolist()) not in train for x in split.test_images)
    assert unseen > 490
    assert split.train_images.min() >= 0 and split.train_images.max() <= 1


def test_translate_matches_a_shifted_copy():
    images = torch.rand(3, 8, 8)
    for down in (-1, 0, 1):
        for right in (-1, 0, 1):
            expected = torch.zeros(3, 8, 8)
            for r in range(8):
                for c in range(8):
                    if 0 <= r - down < 8 and 0 <= c - right < 8:
                        expected[:, r, c] = images[:, r - down, c - right]
            torch.testing.assert_close(translate(images, down, right), expected, rtol=0, atol=0)


def test_tasks_differ_in_inputs_and_labels(split):
    assert len(TASKS) >= 6
    seen = []
    for task in TASKS.values():
        inputs, labels = task_inputs(task, split.train_images, split.train_digits)
        assert inputs.shape == (len(split.train_images), 1, 8, 8)
        assert inputs.min() >= -1 and inputs.max() <= 1
        assert sorted(labels.unique().tolist()) == list(range(task.classes)), task.name
        for other, other_inputs, other_labels in seen:
            same_inputs = torch.equal(inputs, other_inputs)
            assert not (same_inputs and torch.equal(labels, other_labels)), (task.name, other)
        seen.append((task.name, inputs, labels))
    distinct = []
    for _, inputs, _ in seen:
        if not any(torch.equal(inputs, other) for other in distinct):
            distinct.append(inputs)
    assert len(distinct) >= 6  # at least six different input transforms
    assert len({t.classes for t in TASKS.values()}) >= 3  # and label sets of different sizes


def test_calibration_inputs_are_seeded_and_checked(split):
    task = TASKS["rotated"]
    first = calibration_inputs(task, split, 16, seed=0)
    torch.testing.assert_close(first, calibration_inputs(task, split, 16, seed=0), rtol=0, atol=0)
    assert not torch.equal(first, calibration_inputs(task, split, 16, seed=1))
    with pytest.raises(FeatCalError, match=r"task 'rotated': 5000 calibration examples .* holds 1297"):
        calibration_inputs(task, split, 5000, seed=0)
    with pytest.raises(FeatCalError, match="unknown demo task"):
        select_tasks(["digits", "letters"])
    with pytest.raises(FeatCalError, match="named twice"):
        select_tasks(["digits", "digits"])


def test_validation_images_are_labeled_and_never_calibration_images(split):
    task = TASKS["parity"]
    count, reserved = 900, 300
    images, labels = validation_inputs(task, split, reserved, seed=0)
    assert images.shape == (reserved, 1, 8, 8) and set(labels.tolist()) == {0, 1}
    calibration = calibration_inputs(task, split, count, seed=0, reserved=reserved)
    flat = lambda x: {tuple(row.tolist()) for row in x.reshape(len(x), -1)}  # noqa: E731
    assert not flat(images) & flat(calibration)
    available = len(split.train_images) - reserved
    with pytest.raises(FeatCalError, match=f"holds {available} besides the validation images"):
        calibration_inputs(task, split, available + 1, seed=0, reserved=reserved)


def test_coordinate_sweep_finds_the_best_knob_of_each_axis():
    best = {"lambda_ratio": 0.01, "anchor_blend_rho": 3.0, "teacher_interp_alpha": 1.0}
    calls = []

    def evaluate(config):  # separable, one maximum on the grid
        calls.append(config)
        return -sum(abs(getattr(config, k) - v) for k, v in best.items())

    tuning = coordinate_sweep(evaluate, FeatCalConfig(progress=False))
    assert tuning.chosen == best and tuning.validation == 0
    # each configuration evaluated once: round 1 the start and 6 + 5 + 4 others; round 2, which
    # changes nothing, 6 lambdas and 5 rhos at the new point (its alphas were round 1's last axis)
    keys = {tuple(getattr(c, k) for k in GRID) for c in calls}
    assert len(keys) == len(calls) == len(tuning.trials) == 1 + 15 + 11
    assert all(c.sequential == "off" and not c.progress for c in calls)  # the rest of the config kept
    flat = coordinate_sweep(lambda config: 0.5, FeatCalConfig(sequential="group"))
    assert flat.chosen == {"lambda_ratio": 0.05, "anchor_blend_rho": 2.2, "teacher_interp_alpha": 0.25}


def test_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATCAL_CACHE_DIR", str(tmp_path / "here"))
    assert user_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("FEATCAL_CACHE_DIR")
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "featcal"
    monkeypatch.setattr("sys.platform", "darwin")
    assert user_cache_dir().parts[-3:] == ("Library", "Caches", "featcal")
    monkeypatch.setattr("sys.platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert user_cache_dir() == tmp_path / "local" / "featcal" / "Cache"


def test_recipe_key_follows_every_field():
    keys = {Recipe().key(), QUICK_RECIPE.key(), Recipe(seed=1).key(), Recipe(finetune_lr=2e-3).key()}
    assert len(keys) == 4
    assert Recipe().key() == Recipe().key()


def test_cache_round_trip_and_unreadable_entry(tmp_path, caplog):
    split = load_digits_split(TINY.test_size, TINY.seed)
    models, path, reused = load_or_train(TINY, split, root=tmp_path, progress=False)
    assert not reused and path == cache_file(TINY, tmp_path) and path.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, renamed

    saved, loaded = flat_state(models), flat_state(load_models(path, TINY))
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(saved[f"expert/digits/{fc1}"], saved[f"base/{fc1}"])  # experts were trained

    _, _, reused = load_or_train(TINY, split, root=tmp_path, progress=False)
    assert reused

    path.write_bytes(path.read_bytes()[:100])  # a truncated entry is trained again, with a warning
    with caplog.at_level(logging.WARNING, logger="featcal"):
        retrained, _, reused = load_or_train(TINY, split, root=tmp_path, progress=False)
    assert not reused and "unreadable" in caplog.text
    again = flat_state(retrained)  # training is seeded: the same weights
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_demo_config_checks():
    with pytest.raises(FeatCalError, match="merge='avg'"):
        DemoConfig(merge="avg")
    assert DemoConfig(merge="ties").scaling == 1.0 and DemoConfig().scaling == 0.3


def test_cli_refuses_bad_counts_before_training(tmp_path, capsys):
    code = main(["demo", "--quick", "--samples-per-task", "5000", "--cache-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "5000 calibration examples" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was trained
    with pytest.raises(SystemExit):
        main(["demo", "--sweep-samples", "8,x"])


def _accuracies(report: dict) -> dict:
    return {
        name: {k: row[k] for k in ("expert", "merged", "featcal")} for name, row in report["tasks"].items()
    }


def test_quick_demo_end_to_end(tmp_path, capsys):
    """The reduced demo from a cold cache, then warm: report, plot, cache, and FeatCal beating the merge."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    assert main([*args, "--sweep-samples", "8,32"]) == 0
    args.append("--overwrite")  # the later runs replace the first one's report
    printed = capsys.readouterr().out
    assert "average" in printed and "of the gap to the experts recovered" in printed

    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == list(QUICK_RECIPE.tasks)
    for name, row in _accuracies(report).items():
        for key, value in row.items():
            assert isinstance(value, float) and 0 <= value <= 1, (name, key)
        assert row["expert"] > 0.7, name  # the experts learned their tasks
    average = report["average"]
    assert average["featcal"] > average["merged"] + 0.02  # FeatCal wins back accuracy
    assert average["expert"] > average["merged"]
    assert report["gap_recovered"] == pytest.approx(
        (average["featcal"] - average["merged"]) / (average["expert"] - average["merged"])
    )
    assert len(report["drift"]) == QUICK_RECIPE.layers
    assert report["drift"][-1]["featcal"] < report["drift"][-1]["merged"]
    assert [row["samples_per_task"] for row in report["sweep"]] == [8, 32]
    assert report["calibration_seconds"] > 0 and not report["models"]["reused"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(cache.glob("demo-*.safetensors"))) == 1

    # warm: the cached models, and the same numbers
    assert main(args) == 0
    warm = json.loads((out / "report.json").read_text())
    assert warm["models"]["reused"] and warm["models"]["cache"] == report["models"]["cache"]
    assert _accuracies(warm) == _accuracies(report)

    # TIES on the same experts
    assert main([*args, "--merge", "ties"]) == 0
    ties = json.loads((out / "report.json").read_text())
    assert ties["merge"] == {"method": "ties", "name": "TIES", "scaling": 1.0, "density": 0.2}
    assert {n: r["expert"] for n, r in ties["tasks"].items()} == {
        n: r["expert"] for n, r in report["tasks"].items()
    }
    assert ties["average"]["featcal"] > ties["average"]["merged"]

    # knobs tuned on validation images, with sequential statistics
    assert main([*args, "--tune", "--sequential", "group"]) == 0
    assert "picked by a coordinate sweep" in capsys.readouterr().out
    tuned = json.loads((out / "report.json").read_text())
    assert tuned["featcal"]["sequential"] == "group"
    assert {k: tuned["featcal"][k] for k in GRID} == tuned["tuning"]["chosen"]
    assert len(tuned["tuning"]["trials"]) >= 1 + sum(len(v) - 1 for v in GRID.values())
    assert tuned["tuning"]["validation"] == max(t["validation"] for t in tuned["tuning"]["trials"])
    assert tuned["calibration_report"]["config"]["sequential"] == "group"
