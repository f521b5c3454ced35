"""featcal as a FusionBench method, on a tiny local CLIP vision pool (nothing downloaded)."""

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

import featcal
from featcal import FeatCalConfig, FeatCalError

TASKS = ("cars", "dtd")
EXAMPLES = 10  # per task's train dataset
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _integration():
    pytest.importorskip("fusion_bench")
    import featcal.integrations.fusion_bench as integration

    return integration


def _tiny_clip(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def _processor(path: Path) -> None:
    """A CLIPProcessor with a tiny local tokenizer (the pool loads a processor; only its image part runs)."""
    path.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)


def _images(gen: torch.Generator, count: int):
    from PIL import Image

    sizes = torch.randint(32, 48, (count, 2), generator=gen)
    return [
        Image.fromarray(torch.randint(0, 256, (int(h), int(w), 3), generator=gen, dtype=torch.uint8).numpy())
        for h, w in sizes
    ]


def build_pool(root: Path, examples: int = EXAMPLES) -> Path:
    """Base, experts (base plus random task vectors), processor and image datasets, saved in root."""
    import datasets

    base = _tiny_clip(0)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for task in TASKS:
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean().clamp_min(0.1))
        expert.save_pretrained(root / task)
        labels = torch.randint(0, 3, (examples,), generator=gen).tolist()
        data = datasets.Dataset.from_dict({"image": _images(gen, examples), "label": labels})
        data = data.cast_column("image", datasets.Image())
        data.save_to_disk(str(root / f"{task}-train"))
    _processor(root / "processor")
    return root


def fusion_bench_command(root: Path, work: Path, *overrides: str) -> list[str]:
    """The `fusion_bench` command running featcal on the pool in `root` (its config written in `work`)."""
    from omegaconf import OmegaConf

    import featcal.integrations.fusion_bench as integration

    (work / "conf" / "modelpool").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(_pool_config(root)), work / "conf" / "modelpool" / "tiny_clip.yaml")
    command = Path(sys.executable).with_name("fusion_bench")
    args = [str(command)] if command.exists() else [sys.executable, "-m", "fusion_bench"]
    return [
        *args,
        "-cd",
        str(integration.config_dir()),
        "method=featcal",
        "modelpool=tiny_clip",
        "taskpool=dummy",
        f"hydra.searchpath=['file://{work / 'conf'}']",
        *overrides,
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("fusion_bench")
    return build_pool(tmp_path_factory.mktemp("pool"))


def _pool_config(
    root: Path, tasks=TASKS, pretrained: bool = True, only_pretrained: bool = False, extra: dict | None = None
) -> dict:
    models = {"_pretrained_": str(root / "base")} if pretrained else {}
    models |= {} if only_pretrained else {task: str(root / task) for task in TASKS}
    train = {
        t: {"_target_": "datasets.load_from_disk", "dataset_path": str(root / f"{t}-train")} for t in tasks
    }
    return {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": str(root / "processor"),
        "models": models | (extra or {}),
        "train_datasets": train,
    }


def _pool(root: Path, **kwargs):
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import OmegaConf

    config = _pool_config(root, **kwargs)
    del config["_target_"], config["_recursive_"]
    return CLIPVisionModelPool(**OmegaConf.create(config))


def _load(path: Path) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(path).eval()


def _data(root: Path, samples: int, batch: int, seed: int) -> dict:
    """Each task's calibration batches as the method's contract states them."""
    from datasets import load_from_disk

    processor = CLIPProcessor.from_pretrained(root / "processor")
    data = {}
    for task in TASKS:
        dataset = load_from_disk(str(root / f"{task}-train"))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples]
        images = [dataset[int(i)]["image"].convert("RGB") for i in order]
        data[task] = [
            {"pixel_values": processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]}
            for i in range(0, len(images), batch)
        ]
    return data


def _direct(root: Path, merged: torch.nn.Module, samples: int, batch: int, seed: int) -> dict:
    experts = {task: _load(root / task) for task in TASKS}
    result = featcal.calibrate(
        merged,
        base=_load(root / "base"),
        experts=experts,
        data=_data(root, samples, batch, seed),
        config=FeatCalConfig(progress=False),
    )
    return result.model.state_dict()


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _assert_calibrated(got: dict, merge: dict) -> None:
    changed = [k for k in merge if not torch.allclose(got[k], merge[k], rtol=1e-4, atol=1e-6)]
    assert any("layers.1.mlp" in k for k in changed), "the calibration left the merge as it was"


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
def test_run_is_calibrate_on_the_merge(files, merge):
    integration = _integration()
    seed = int(torch.randint(0, 2**31 - 1, ()))
    method = integration.FeatCalAlgorithm(
        merge=merge, samples_per_task=6, batch_size=4, seed=seed, progress=False
    )
    got = method.run(_pool(files)).state_dict()

    base, experts = _load(files / "base"), {task: _load(files / task) for task in TASKS}
    if merge == "ties":
        merged = featcal.ties_merging(base, experts, scaling=1.0, density=0.2)
    else:
        merged = featcal.task_arithmetic(base, experts, scaling=0.3)
    merge_state = copy.deepcopy(merged.state_dict())
    want = _direct(files, merged, samples=6, batch=4, seed=seed)
    _assert_same(got, want)
    _assert_calibrated(got, merge_state)
    assert method.report is not None and set(method.report.tasks) == set(TASKS)
    cars = method.report.tasks["cars"]
    assert (cars["batches"], cars["tokens"]) == (2, 6 * 17)  # 16 patches + class token


@pytest.mark.parametrize("given", ["pool name", "directory"])
def test_run_calibrates_a_given_merged_model(files, tmp_path, given):
    integration = _integration()
    base, experts = _load(files / "base"), {task: _load(files / task) for task in TASKS}
    merged = featcal.task_arithmetic(base, experts, scaling=0.6)
    merged.save_pretrained(tmp_path / "merged")
    name = "_merged_" if given == "pool name" else str(tmp_path / "merged")
    pool = _pool(files, extra={"_merged_": str(tmp_path / "merged")})
    method = integration.FeatCalAlgorithm(merged_model=name, samples_per_task=5, batch_size=5, progress=False)
    got = method.run(pool).state_dict()

    want = _direct(files, _load(tmp_path / "merged"), samples=5, batch=5, seed=0)
    _assert_same(got, want)
    _assert_calibrated(got, merged.state_dict())


def test_bad_pools_and_settings_name_the_fault(files):
    integration = _integration()
    from fusion_bench.modelpool import BaseModelPool

    method = integration.FeatCalAlgorithm(samples_per_task=2, progress=False)
    with pytest.raises(FeatCalError, match="_pretrained_"):
        method.run(_pool(files, pretrained=False))
    with pytest.raises(FeatCalError, match="expert 'dtd' has no train dataset"):
        method.run(_pool(files, tasks=("cars",)))
    with pytest.raises(FeatCalError, match="no processor"):
        method.run(BaseModelPool(_pool_config(files)["models"]))
    with pytest.raises(FeatCalError, match="no expert models"):
        method.run(_pool(files, tasks=(), only_pretrained=True))
    missing = integration.FeatCalAlgorithm(merged_model=str(files / "nowhere"), progress=False)
    with pytest.raises(FeatCalError, match="nowhere"):
        missing.run(_pool(files))
    with pytest.raises(FeatCalError, match="merge='dare'"):
        integration.FeatCalAlgorithm(merge="dare")
    with pytest.raises(FeatCalError, match="sequential"):
        integration.FeatCalAlgorithm(sequential="layer")


def test_defaults_are_featcal_config_and_the_yaml(files):
    integration = _integration()
    from omegaconf import OmegaConf

    defaults = {
        name: p.default
        for name, p in inspect.signature(integration.FeatCalAlgorithm.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert {k: defaults[k] for k in FeatCalConfig().to_dict()} == FeatCalConfig().to_dict()
    assert integration.FeatCalAlgorithm().featcal_config() == FeatCalConfig()
    yaml = OmegaConf.to_container(OmegaConf.load(integration.config_dir() / "method" / "featcal.yaml"))
    assert yaml.pop("_target_") == "featcal.integrations.fusion_bench.FeatCalAlgorithm"
    assert yaml == defaults


def test_import_featcal_leaves_fusion_bench_alone():
    code = "import sys, featcal; assert 'fusion_bench' not in sys.modules, 'featcal imported fusion_bench'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_fusion_bench_says_what_to_install():
    code = (
        "import sys; sys.modules['fusion_bench'] = None\n"
        "try:\n    import featcal.integrations.fusion_bench\n"
        "except ImportError as err:\n    print(err)\nelse:\n    raise SystemExit('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "featcal[fusion-bench]"' in proc.stdout


def test_fusion_bench_command_runs_featcal(files, tmp_path):
    integration = _integration()
    args = fusion_bench_command(
        files,
        tmp_path,
        "method.samples_per_task=6",
        "method.batch_size=3",
        "method.seed=7",
        "method.progress=false",
        f"merged_model_save_path={tmp_path / 'calibrated'}",
    )
    env = os.environ | OFFLINE | {"FUSION_BENCH_PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    logs = "".join(log.read_text() for log in tmp_path.glob("outputs/*/*/*.log"))  # hydra's job log
    assert "FeatCal calibrated the merged model of 2 tasks" in logs, output[-4000:]
    assert "2 tasks, 204 tokens" in logs  # 6 examples of 17 tokens per task

    got = _load(tmp_path / "calibrated").state_dict()
    method = integration.FeatCalAlgorithm(samples_per_task=6, batch_size=3, seed=7, progress=False)
    want = method.run(_pool(files)).state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    base, experts = _load(files / "base"), {task: _load(files / task) for task in TASKS}
    _assert_calibrated(got, featcal.task_arithmetic(base, experts, scaling=0.3).state_dict())
