"""featcal on mergekit's outputs: the recipe read from mergekit_config.yml, the files kept, and
`featcal merge` equal to mergekit's own merges (where mergekit is installed)."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import LLAMA, make_data, make_experts, word_tokenizer

from featcal import FeatCalError
from featcal.cli import main
from featcal.data import save_calibration_file
from featcal.integrations.mergekit import read_recipe
from featcal.io.atomic_file import umask
from featcal.io.lazy_checkpoint import LazyCheckpoint


def _weights(path):
    checkpoint = LazyCheckpoint(path)
    return checkpoint.read(checkpoint.keys())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/{base,math,code} (float32 tiny Llamas, the base with a tokenizer) and data files."""
    root = tmp_path_factory.mktemp("mergekit")
    base = LLAMA.build(0).float()
    base.save_pretrained(root / "models" / "base")
    word_tokenizer().save_pretrained(root / "models" / "base")
    experts = dict(zip(["math", "code"], make_experts(base, 2, rel=0.2).values()))
    for name, expert in experts.items():
        expert.save_pretrained(root / "models" / name)
    for task, batches in make_data(LLAMA, list(experts), batches=2, size=4).items():
        save_calibration_file(
            root / f"{task}.safetensors", {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        )
    return root


def _recipe(root, text: str):
    return textwrap.dedent(text).replace("MODELS", str(root / "models"))


TIES = """
    merge_method: ties
    base_model: MODELS/base
    models:
      - model: MODELS/base
      - model: MODELS/math
        parameters: {weight: 0.4, density: 0.3}
      - model: MODELS/code
        parameters: {weight: 0.7, density: 0.3}
    parameters: {normalize: true, lambda: 0.9}
    dtype: float32
"""
TASK_ARITHMETIC = """
    merge_method: task_arithmetic
    base_model: MODELS/base
    models:
      - model: MODELS/math
        parameters: {weight: 0.4}
      - model: MODELS/code
        parameters: {weight: 0.7}
    parameters: {lambda: 0.9}
    dtype: float32
"""


def _mergekit(root, recipe: str, out):
    """Run mergekit's own command on the recipe (skipped where mergekit is not installed)."""
    pytest.importorskip("mergekit")
    config = out.parent / f"{out.name}.yml"
    config.write_text(_recipe(root, recipe))
    script = "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", script, str(config), str(out), "--allow-crimes"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mergekit_ties(models):
    return _mergekit(models, TIES, models / "merged-ties")


@pytest.mark.parametrize(
    "recipe, args",
    [
        (TIES, ["--method", "ties", "--trim", "per-tensor", "--density", "0.3", "--scaling", "0.9"]),
        (TASK_ARITHMETIC, ["--method", "ta", "--scaling", "0.9"]),
    ],
    ids=["ties", "task_arithmetic"],
)
def test_featcal_merge_equals_mergekit(models, tmp_path, recipe, args):
    theirs = _weights(_mergekit(models, recipe, tmp_path / "mergekit"))
    experts = [f"math={models / 'models' / 'math'}:0.4", f"code={models / 'models' / 'code'}:0.7"]
    out = tmp_path / "featcal"
    assert (
        main(
            [
                "merge",
                *args,
                "--base",
                str(models / "models" / "base"),
                "--experts",
                *experts,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours = _weights(out)
    assert set(ours) == set(theirs)
    base = _weights(models / "models" / "base")
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.equal(value, base[key]) or value.dim() == 1  # the merge moved every matrix
    if "ties" in args:  # the global trim is another merge
        main(
            [
                "merge",
                *args[:2],
                "--density",
                "0.3",
                "--scaling",
                "0.9",
                "--base",
                str(models / "models" / "base"),
                "--experts",
                *experts,
                "--out",
                str(tmp_path / "global"),
            ]
        )
        other = _weights(tmp_path / "global")
        assert any(not torch.equal(other[k], ours[k]) for k in ours)


def test_calibrate_reads_the_recipe_and_keeps_the_files(models, mergekit_ties, tmp_path, capsys):
    merged = tmp_path / "merged"
    import shutil

    shutil.copytree(mergekit_ties, merged)
    (merged / "tokenizer.model").write_bytes(b"\x00sentencepiece-stand-in")
    (merged / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    data = [f"math={models / 'math.safetensors'}", f"code={models / 'code.safetensors'}"]
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--merged", str(merged), "--data", *data, "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"experts math={models / 'models' / 'math'}, code={models / 'models' / 'code'}" in err
    explicit = tmp_path / "explicit"
    experts = [f"math={models / 'models' / 'math'}", f"code={models / 'models' / 'code'}"]
    args = ["--base", str(models / "models" / "base"), "--experts", *experts]
    assert (
        main(
            ["calibrate", "--merged", str(merged), *args, "--data", *data, "--out", str(explicit), "--quiet"]
        )
        == 0
    )
    ours, want = _weights(out), _weights(explicit)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    assert any(not torch.equal(ours[k], v) for k, v in _weights(merged).items())
    for name in (
        "mergekit_config.yml",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "chat_template.json",
    ):
        assert (out / name).read_bytes() == (merged / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert card.startswith((merged / "README.md").read_text())
    assert "## FeatCal calibration" in card and "math" in card and "| block |" in card
    assert oct((out).stat().st_mode & 0o777) == oct(0o777 & ~umask())


def test_calibrate_overrides_one_expert_of_the_recipe(models, mergekit_ties, tmp_path, capsys):
    data = [f"math={models / 'math.safetensors'}", f"code={models / 'code.safetensors'}"]
    other = models / "models" / "code"  # math calibrated toward the code expert: a visible change
    args = ["calibrate", "--merged", str(mergekit_ties), "--data", *data, "--quiet", "--experts"]
    assert main([*args, f"math={other}", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "featcal_report.json").read_text())
    assert report["inputs"]["experts"] == {"math": str(other), "code": str(other)}
    assert main([*args, f"poetry={other}", "--out", str(tmp_path / "no")]) == 2
    assert "--experts names ['poetry'], which" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def _write(tmp_path, recipe: str, layers: int = 2):
    directory = tmp_path / "out"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    (directory / "mergekit_config.yml").write_text(textwrap.dedent(recipe))
    return directory


def test_recipe_forms(tmp_path):
    whole = _write(
        tmp_path,
        """
        merge_method: dare_ties
        slices:
          - sources:
              - {model: org/base-7b, layer_range: [0, 1]}
              - {model: ./experts/math-7b, layer_range: [0, 1]}
          - sources:
              - {model: org/base-7b, layer_range: [1, 2]}
              - {model: ./experts/math-7b, layer_range: [1, 2]}
        base_model: org/base-7b
    """,
    )
    recipe = read_recipe(whole)
    assert recipe.base == "org/base-7b" and recipe.experts == {"math-7b": "./experts/math-7b"}
    assert recipe.merge_method == "dare_ties"
    listed = _write(
        tmp_path,
        """
        merge_method: dare_ties
        base_model: /m/base
        models: [{model: /m/base}, {model: /m/a/chat}, {model: /m/b/code/}]
    """,
    )
    assert read_recipe(listed).experts == {"chat": "/m/a/chat", "code": "/m/b/code/"}


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("merge_method: linear\nmodels: [{model: /m/a}, {model: /m/b}]\n", "names no base_model"),
        (
            "merge_method: ties\nbase_model: /m/base\nmodels: [{model: /x/chat}, {model: /y/chat}]\n",
            "would both be called 'chat'",
        ),
        (
            "merge_method: ties\nbase_model: /m/base\nmodels: [{model: /m/a+/m/lora}]\n",
            "applies a LoRA adapter",
        ),
        (
            "merge_method: ties\nslices:\n  - sources: [{model: /m/a, layer_range: [0, 2]}]\n"
            "  - sources: [{model: /m/b, layer_range: [0, 2]}]\n",
            "slice 1 takes layers [0, 2] of /m/b",
        ),
        (
            "merge_method: ties\nbase_model: /m/a\n"
            "slices:\n  - sources: [{model: /m/a, layer_range: [0, 1]}]\n",
            "the slices cover layers 0 to 1 but the merged model has 2",
        ),
        ("merge_method: ties\nbase_model: /m/base\nmodels: [{model: /m/base}]\n", "names no model besides"),
        ("merge_method: [unclosed\n", "is not valid YAML"),
        ("merge_method: slerp\nbase_model: /m/a\nmodels: [{model: /m/a}, {model: /m/b}]\n", "interpolates"),
        (
            "merge_method: ties\nbase_model: /m/a\nslices:\n"
            "  - sources: [{model: /m/a, layer_range: [0, 1]}, {model: /m/b, layer_range: [0, 1]}]\n"
            "  - sources: [{model: /m/a, layer_range: [1, 2]}, {model: /m/c, layer_range: [1, 2]}]\n",
            "slice 1 merges ['/m/a', '/m/c'] but slice 0 ['/m/a', '/m/b']",
        ),
        (
            "merge_method: ties\nbase_model: /m/a\nmodels: [{model: chat}]\n",
            "names the model chat, which is neither",
        ),
    ],
    ids=[
        "no-base",
        "same-name",
        "lora",
        "frankenmerge",
        "short-slices",
        "no-expert",
        "bad-yaml",
        "slerp",
        "stitched",
        "bare-name",
    ],
)
def test_recipe_refusals(tmp_path, recipe, message):
    with pytest.raises(FeatCalError, match=re.escape(message)):
        read_recipe(_write(tmp_path, recipe))


def test_calibrate_without_recipe_asks_for_base_and_experts(models, tmp_path, capsys):
    args = [
        "calibrate",
        "--merged",
        str(models / "models" / "math"),
        "--data",
        "x=y",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "give --base and --experts" in capsys.readouterr().err


def test_model_card_is_written_afresh_and_keeps_the_source_bytes(tmp_path):
    """A resumed run writes the card again: one FeatCal section, after the merged model's card as
    it is (here not UTF-8)."""
    from featcal.io.model_card import append_featcal_section
    from featcal.pipeline.report import BlockReport, CalibrationReport

    source, out = tmp_path / "merged", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "README.md").write_bytes("# caf\xe9 merge".encode("latin-1"))
    blocks = [BlockReport(index=0, seconds=1.0, drift_merged=0.25, drift_calibrated=0.125)]
    report = CalibrationReport(blocks, {"math": {"batches": 1, "tokens": 12}}, 1.0, "cpu", None, None, {}, {})
    for _ in range(2):
        append_featcal_section(out, report, source)
    card = (out / "README.md").read_bytes()
    assert card.startswith("# caf\xe9 merge\n\n## FeatCal calibration".encode("latin-1"))
    assert card.count(b"## FeatCal calibration") == 1 and b"| 0 | 0.2500 | 0.1250 |" in card
    append_featcal_section(out, report, None)
    assert (out / "README.md").read_text().startswith("## FeatCal calibration")
