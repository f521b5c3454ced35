"""Bad calibration input is refused up front, through the API and the command, with a message that
names the task, key and shape or value at fault (and no traceback, no output left behind); the
report counts padding apart, says where every input came from, and warns when drift rises."""

import copy
import json
import logging

import pytest
import torch
from tiny_models import (
    CLIP_VISION,
    LLAMA,
    STACK_ADAPTER,
    T5,
    VIT,
    Stack,
    ToyBlock,
    make_data,
    make_experts,
    registered,
    setup,
)

import featcal
import featcal.pipeline.driver as driver
from featcal import FeatCalConfig, FeatCalError, calibrate, task_arithmetic
from featcal.cli import main
from featcal.io.data_files import CalibrationData, load_calibration_file, save_calibration_file
from featcal.models.sources import open_source
from featcal.pipeline.checks import check_device, check_inputs, model_inputs
from featcal.pipeline.distributed import Collectives, process_device, process_group_from_environment
from featcal.pipeline.report import CalibrationReport

CFG = FeatCalConfig(progress=False)
VOCAB = 100  # the tiny text models' vocab_size


def _ids(gen, size=4, length=10, low=2, high=VOCAB):
    return torch.randint(low, high, (size, length), generator=gen)


def _calibrate(models, data, **kwargs):
    base, experts, merged, _ = models
    return calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=CFG, **kwargs)


@pytest.fixture(scope="module")
def llama():
    return setup(LLAMA, tasks=2, dtype=torch.float32)


@pytest.fixture(scope="module")
def clip():
    return setup(CLIP_VISION, tasks=2, dtype=torch.float32)


# --- the API ---------------------------------------------------------------------------------


def test_image_inputs_given_to_a_text_model_are_refused(llama):
    gen = torch.Generator().manual_seed(11)
    data = dict(llama[3], task1=[{"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)}])
    with pytest.raises(FeatCalError) as err:
        _calibrate(llama, data)
    message = str(err.value)
    assert message.startswith("task 'task1', batch 0: the batch holds ['pixel_values']")
    assert "merged llama model (LlamaForCausalLM) takes input_ids" in message


def test_token_ids_given_to_a_vision_model_are_refused(clip):
    gen = torch.Generator().manual_seed(12)
    data = dict(clip[3], task0=[{"input_ids": _ids(gen)}])
    with pytest.raises(FeatCalError, match=r"task 'task0', batch 0: the batch holds \['input_ids'\]") as err:
        _calibrate(clip, data)
    assert "clip-vision model (CLIPVisionModel) takes pixel_values" in str(err.value)


def test_precomputed_embeddings_stand_in_for_token_ids(llama):
    source = open_source(llama[2], "merged model")
    assert model_inputs(source).first == "input_ids" and "inputs_embeds" in model_inputs(source).alternatives
    check_inputs(source, "task0", [{"inputs_embeds": torch.randn(2, 5, 32)}])  # accepted: no error
    with pytest.raises(FeatCalError, match=r"task 'task0', batch 0: the batch holds \['position_ids'\]"):
        check_inputs(source, "task0", [{"position_ids": torch.arange(5)[None]}])


def test_a_registered_family_is_checked_by_its_forward_signature():
    with registered(STACK_ADAPTER):  # no `inputs`: the keys are Stack.forward's, (x)
        torch.manual_seed(31)
        base = Stack([ToyBlock(), ToyBlock()], 16)
        experts = make_experts(base, 2)
        merged = task_arithmetic(base, experts)
        gen = torch.Generator().manual_seed(31)
        data = {
            "task0": [torch.randn(4, 6, 3, generator=gen)],
            "task1": [{"y": torch.randn(4, 6, 3, generator=gen)}],
        }
        with pytest.raises(
            FeatCalError,
            match=r"task 'task1', batch 0: the batch holds \['y'\] but the merged stack model \(Stack\) "
            "takes x",
        ):
            calibrate(merged, base=base, experts=experts, data=data, config=CFG)
        data["task1"] = [{"x": torch.randn(4, 6, 3, generator=gen)}]
        _, report = calibrate(merged, base=base, experts=experts, data=data, config=CFG)
        assert len(report.blocks) == 2


@pytest.mark.parametrize("high", [VOCAB + 7, 5 * VOCAB])
def test_token_ids_beyond_the_vocabulary_name_the_largest_id(llama, high):
    gen = torch.Generator().manual_seed(high)
    bad = _ids(gen)
    bad[2, 3] = high
    data = dict(
        llama[3], task1=[llama[3]["task1"][0], {"input_ids": bad, "attention_mask": torch.ones_like(bad)}]
    )
    with pytest.raises(FeatCalError) as err:
        _calibrate(llama, data)
    assert str(err.value).startswith(f"task 'task1': input_ids hold token ids up to {high} (batch 1)")
    assert f"vocab_size {VOCAB}, ids 0 to {VOCAB - 1}" in str(err.value)


def test_negative_token_ids_name_the_smallest_id(llama):
    gen = torch.Generator().manual_seed(13)
    bad = _ids(gen)
    bad[0, 0], bad[1, 4] = -2, -9
    data = dict(llama[3], task0=[{"input_ids": bad}])
    with pytest.raises(
        FeatCalError, match=r"task 'task0': input_ids hold a negative token id, -9 \(batch 0\); .*\[0, 100\)"
    ):
        _calibrate(llama, data)


def test_a_bare_tensor_batch_is_the_models_first_input(llama, clip):
    gen = torch.Generator().manual_seed(14)
    ids = _ids(gen, high=VOCAB + 40)
    ids[0, 0] = VOCAB + 40
    with pytest.raises(
        FeatCalError, match=r"tensor batches \(input_ids, the model's first input\) hold token ids up to 140"
    ):
        _calibrate(llama, dict(llama[3], task0=[ids]))
    pixels = torch.randn(2, 3, 24, 32, generator=gen)
    with pytest.raises(
        FeatCalError, match=r"\(pixel_values, the model's first input\) have shape \(2, 3, 24, 32\)"
    ):
        _calibrate(clip, dict(clip[3], task1=[pixels]))


def test_token_ids_must_be_integers_and_the_mask_their_shape(llama):
    gen = torch.Generator().manual_seed(15)
    ids = _ids(gen)
    with pytest.raises(
        FeatCalError, match=r"task 'task0', batch 0: input_ids are torch.float32; token ids must"
    ):
        _calibrate(llama, dict(llama[3], task0=[{"input_ids": ids.float()}]))
    short = torch.ones(ids.shape[0], ids.shape[1] - 3, dtype=torch.long)
    with pytest.raises(
        FeatCalError,
        match=r"task 'task1', batch 0: attention_mask has shape \(4, 7\) but input_ids \(4, 10\)",
    ):
        _calibrate(llama, dict(llama[3], task1=[{"input_ids": ids, "attention_mask": short}]))
    with pytest.raises(
        FeatCalError, match=r"input_ids have shape \(10,\); token ids are \(examples, tokens\)"
    ):
        _calibrate(llama, dict(llama[3], task1=[{"input_ids": ids[0]}]))


def test_t5_token_ids_are_checked_against_its_vocabulary():
    models = setup(T5, tasks=2, dtype=torch.float32)
    data = copy.deepcopy(models[3])
    data["task1"][0]["decoder_input_ids"][1, 2] = VOCAB + 3
    with pytest.raises(
        FeatCalError, match=r"task 'task1': decoder_input_ids hold token ids up to 103 \(batch 0\)"
    ):
        _calibrate(models, data)
    data = copy.deepcopy(models[3])
    data["task0"][1]["input_ids"][0, 0] = 2 * VOCAB
    with pytest.raises(FeatCalError, match=r"merged t5 model \(T5Model\): vocab_size 100"):
        _calibrate(models, data)


@pytest.mark.parametrize(
    ("family", "shape"),
    [(CLIP_VISION, (4, 3, 48, 48)), (CLIP_VISION, (4, 1, 32, 32)), (VIT, (4, 3, 32, 40))],
    ids=["clip-size", "clip-channels", "vit-width"],
)
def test_images_of_another_size_are_refused_with_both_shapes(family, shape):
    models = setup(family, tasks=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(sum(shape))
    data = dict(
        models[3], task1=[models[3]["task1"][0], {"pixel_values": torch.randn(*shape, generator=gen)}]
    )
    with pytest.raises(FeatCalError) as err:
        _calibrate(models, data)
    assert str(err.value).startswith(f"task 'task1', batch 1: pixel_values have shape {shape}")
    assert "takes images of shape (4, 3, 32, 32)" in str(err.value)


def test_a_streamed_merged_model_is_checked_from_its_skeleton(llama, tmp_path):
    base, experts, merged, data = llama
    merged.save_pretrained(tmp_path / "merged")
    bad = copy.deepcopy(data)
    bad["task0"][0]["input_ids"][0, 1] = VOCAB
    out = tmp_path / "out"
    with pytest.raises(FeatCalError, match=r"task 'task0': input_ids hold token ids up to 100 \(batch 0\)"):
        calibrate(tmp_path / "merged", base=base, experts=experts, data=bad, config=CFG, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# --- data files ------------------------------------------------------------------------------


def test_a_data_file_loads_as_calibration_data_with_its_path(tmp_path):
    gen = torch.Generator().manual_seed(21)
    ids = _ids(gen, size=5)
    path = tmp_path / "t.safetensors"
    save_calibration_file(path, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    data = load_calibration_file(path, 2)
    assert isinstance(data, CalibrationData) and isinstance(data, list) and data.path == path
    assert [b["input_ids"].shape[0] for b in data] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in data]), ids)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_data_file_is_named(tmp_path, damage):
    gen = torch.Generator().manual_seed(22)
    path = tmp_path / "data.safetensors"
    save_calibration_file(path, {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)})
    whole = path.read_bytes()
    path.write_bytes(
        {"truncated": whole[: len(whole) // 2], "garbage": b"not a file" * 5, "empty": b""}[damage]
    )
    with pytest.raises(FeatCalError, match=rf"data file {path} is not a readable safetensors file"):
        load_calibration_file(path, 4)


# --- the device ------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_is_refused_before_any_work(llama, no_cuda, tmp_path):
    with pytest.raises(FeatCalError) as err:
        # the merged model does not exist: the device is refused before it is looked for
        calibrate(
            tmp_path / "nowhere",
            base=llama[0],
            experts=llama[1],
            data=llama[3],
            device="cuda",
            out=tmp_path / "out",
        )
    message = str(err.value)
    assert message.startswith("device 'cuda': CUDA is not available to this torch")
    assert torch.__version__ in message
    if torch.version.cuda is None:
        assert "a CPU-only build" in message
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_device_is_named(llama):
    with pytest.raises(FeatCalError, match=r"device 'gpu' is not a device torch knows"):
        _calibrate(llama, llama[3], device="gpu")
    assert check_device("cpu") == torch.device("cpu") and check_device(None) is None


class _TwoProcesses(Collectives):
    def __init__(self, backend):
        super().__init__()
        self.world, self.backend = 2, backend


def test_cuda_without_cuda_under_torchrun(no_cuda, monkeypatch):
    with pytest.raises(FeatCalError, match=r"device 'cuda': CUDA is not available to this torch"):
        process_device(torch.device("cuda"), _TwoProcesses("nccl"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FeatCalError, match=r"device 'cuda:1': CUDA is not available"):
        with process_group_from_environment("cuda:1", 5.0):
            pass
    with pytest.raises(FeatCalError, match=r"device 'gpu' is not a device torch knows"):
        with process_group_from_environment("gpu", 5.0):
            pass


# --- the report ------------------------------------------------------------------------------


def test_tokens_are_the_non_padding_ones_and_padding_is_counted_apart(llama):
    _, report = _calibrate(llama, llama[3])
    for task, batches in llama[3].items():
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        assert 0 < real < padded
        assert report.tasks[task] == {"batches": 2, "tokens": real, "padding_tokens": padded - real}
    real = sum(t["tokens"] for t in report.tasks.values())
    padding = sum(t["padding_tokens"] for t in report.tasks.values())
    assert f"2 tasks, {real} tokens ({padding} padding), 2 blocks" in report.summary()


def test_the_report_says_where_in_memory_inputs_came_from(clip):
    _, report = _calibrate(clip, clip[3])
    inputs = report.inputs
    assert inputs.merged == inputs.base == "in-memory module"
    assert inputs.experts == {"task0": "in-memory module", "task1": "in-memory module"}
    assert {t: (d.source, d.examples) for t, d in inputs.data.items()} == {
        "task0": ("in memory", 8),
        "task1": ("in memory", 8),
    }
    assert inputs.torch_version == torch.__version__
    assert CalibrationReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_a_hub_id_is_reported_as_it_is(tmp_path):
    assert driver._describe_model("someone/some-model") == "someone/some-model"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert driver._describe_model(tmp_path / "ckpt" / ".." / "ckpt") == str((tmp_path / "ckpt").resolve())


def test_calibrating_an_expert_as_the_merge_warns_that_drift_rose(clip):
    base, experts, _, data = clip
    _, normal = _calibrate(clip, data)
    assert not [w for w in normal.warnings if "raised the mean drift" in w]
    assert all(b.drift_calibrated < b.drift_merged for b in normal.blocks)

    _, report = calibrate(copy.deepcopy(experts["task0"]), base=base, experts=experts, data=data, config=CFG)
    raised = [b for b in report.blocks if b.drift_calibrated > 1.01 * b.drift_merged]
    assert raised  # the case this test is about: calibrating toward the other expert moves task0 away
    (warning,) = [w for w in report.warnings if "raised the mean drift" in w]
    assert f"by more than 1% at {len(raised)} of {len(report.blocks)} blocks" in warning
    b = raised[0]
    assert f"block {b.index} {b.drift_merged:.4g} -> {b.drift_calibrated:.4g}" in warning
    assert "not one of the experts" in warning and "lambda_ratio" in warning
    assert f"warning: {warning}" in report.summary()


def test_a_rise_of_drift_within_rounding_is_not_warned_about(caplog):
    from featcal.pipeline.report import BlockReport

    def blocks(rise):
        return [
            BlockReport(0, 0.1, drift_merged=0.2, drift_calibrated=0.1),
            BlockReport(1, 0.1, None, 0.2, 0.2 * rise),
        ]

    with caplog.at_level(logging.WARNING, logger="featcal"):
        driver._warn_drift_raised(blocks(1.005))
        assert not caplog.records
        driver._warn_drift_raised(blocks(1.03))
    (record,) = caplog.records
    assert "by more than 1% at 1 of 2 blocks: block 1 0.2 -> 0.206;" in record.getMessage()


# --- the command -----------------------------------------------------------------------------


def _save_set(root, family, seed):
    base = family.build(seed)
    experts = make_experts(base, 2, seed=seed + 1)
    base.save_pretrained(root / "base")
    task_arithmetic(base, experts, 0.3).save_pretrained(root / "merged")
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    return list(experts)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """Llama and CLIP checkpoints (base, merged, experts) under one root each."""
    roots = {}
    for name, family, seed in (("llama", LLAMA, 30), ("clip", CLIP_VISION, 40)):
        root = tmp_path_factory.mktemp(name)
        roots[name] = (root, _save_set(root, family, seed))
    return roots


def _args(root, tasks, data, out, merged=None):
    return [
        "calibrate",
        "--base",
        str(root / "base"),
        "--merged",
        str(merged or root / "merged"),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--quiet",
        "--experts",
        *[f"{t}={root / t}" for t in tasks],
        "--data",
        *[f"{t}={p}" for t, p in data.items()],
    ]


def _files(tmp_path, tensors_by_task):
    paths = {}
    for task, tensors in tensors_by_task.items():
        paths[task] = tmp_path / f"{task}.safetensors"
        save_calibration_file(paths[task], tensors)
    return paths


def _good_text(gen, size=8):
    ids = _ids(gen, size=size, length=9)
    mask = (torch.arange(9)[None] < torch.randint(3, 10, (size, 1), generator=gen)).long()
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def _refused(capsys, args, tmp_path, *needles):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcal: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    left = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")}
    assert left == set()  # neither out/ nor out.featcal-partial
    return err


def test_command_refuses_images_for_a_text_model(disk, tmp_path, capsys):
    root, tasks = disk["llama"]
    gen = torch.Generator().manual_seed(51)
    files = _files(
        tmp_path,
        {"task0": _good_text(gen), "task1": {"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)}},
    )
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        "task 'task1', batch 0: the batch holds ['pixel_values']",
        "takes input_ids",
    )


def test_command_refuses_token_ids_for_a_vision_model(disk, tmp_path, capsys):
    root, tasks = disk["clip"]
    gen = torch.Generator().manual_seed(52)
    files = _files(
        tmp_path,
        {"task0": _good_text(gen), "task1": {"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)}},
    )
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        "task 'task0', batch 0: the batch holds ['attention_mask', 'input_ids']",
        "takes pixel_values",
    )


def test_command_refuses_token_ids_beyond_the_vocabulary(disk, tmp_path, capsys):
    root, tasks = disk["llama"]
    gen = torch.Generator().manual_seed(53)
    bad = _good_text(gen)
    bad["input_ids"][5, 0] = VOCAB + 21
    files = _files(tmp_path, {"task0": _good_text(gen), "task1": bad})
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        "task 'task1': input_ids hold token ids up to 121 (batch 1)",
        "vocab_size 100",
    )


def test_command_refuses_a_mask_of_another_shape(disk, tmp_path, capsys):
    root, tasks = disk["llama"]
    gen = torch.Generator().manual_seed(54)
    bad = _good_text(gen)
    bad["attention_mask"] = bad["attention_mask"][:, :-2]
    files = _files(tmp_path, {"task0": bad, "task1": _good_text(gen)})
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        "task 'task0', batch 0: attention_mask has shape (4, 7) but input_ids (4, 9)",
    )


def test_command_refuses_images_of_another_size(disk, tmp_path, capsys):
    root, tasks = disk["clip"]
    gen = torch.Generator().manual_seed(55)
    files = _files(
        tmp_path,
        {
            "task0": {"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)},
            "task1": {"pixel_values": torch.randn(8, 3, 64, 64, generator=gen)},
        },
    )
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        "task 'task1', batch 0: pixel_values have shape (4, 3, 64, 64)",
        "takes images of shape (4, 3, 32, 32)",
    )


def test_command_names_a_truncated_data_file(disk, tmp_path, capsys):
    root, tasks = disk["clip"]
    gen = torch.Generator().manual_seed(56)
    files = _files(tmp_path, {t: {"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)} for t in tasks})
    whole = files["task1"].read_bytes()
    files["task1"].write_bytes(whole[: len(whole) - 100])
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out"),
        tmp_path,
        f"data file {files['task1']} is not a readable safetensors file",
    )


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_command_refuses_a_device_it_cannot_use(disk, tmp_path, capsys, no_cuda, device):
    root, tasks = disk["clip"]
    gen = torch.Generator().manual_seed(57)
    files = _files(tmp_path, {t: {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)} for t in tasks})
    want = "CUDA is not available to this torch" if device == "cuda" else "is not a device torch knows"
    _refused(
        capsys,
        _args(root, tasks, files, tmp_path / "out") + ["--device", device],
        tmp_path,
        f"featcal: error: device '{device}'",
        want,
    )


def test_command_reports_its_inputs_and_padding(disk, tmp_path, capsys):
    root, tasks = disk["llama"]
    gen = torch.Generator().manual_seed(58)
    text = {t: _good_text(gen) for t in tasks}
    files = _files(tmp_path, text)
    out = tmp_path / "out"
    assert main(_args(root, tasks, files, out)) == 0
    printed = capsys.readouterr().out
    report = CalibrationReport.from_dict(json.loads((out / "featcal_report.json").read_text()))
    inputs = report.inputs
    assert inputs.merged == str((root / "merged").resolve()) and inputs.base == str((root / "base").resolve())
    assert inputs.experts == {t: str((root / t).resolve()) for t in tasks}
    assert {t: (d.source, d.examples) for t, d in inputs.data.items()} == {
        t: (str(files[t].resolve()), 8) for t in tasks
    }
    real = sum(int(text[t]["attention_mask"].sum()) for t in tasks)
    padding = sum(text[t]["attention_mask"].numel() for t in tasks) - real
    assert f"2 tasks, {real} tokens ({padding} padding)" in printed
    assert inputs.featcal_version == featcal.__version__ and inputs.torch_version == torch.__version__


def test_command_warns_when_an_expert_is_given_as_the_merge(disk, tmp_path, capsys):
    root, tasks = disk["clip"]
    data = make_data(CLIP_VISION, tasks, batches=2, size=4, seed=59)
    files = _files(
        tmp_path, {t: {"pixel_values": torch.cat([b["pixel_values"] for b in data[t]])} for t in tasks}
    )
    assert main(_args(root, tasks, files, tmp_path / "out", merged=root / "task0")) == 0
    printed = capsys.readouterr().out
    assert "warning: calibration raised the mean drift (merged -> calibrated) by more than 1% at " in printed
    assert "not one of the experts" in printed
