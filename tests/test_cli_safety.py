"""The CLI's refusals of bad models and paths (exit 2, a message naming the fault, nothing written),
and the small things a user expects of it: --version, defaults in --help, modes, log lines."""

import io
import logging
import shutil

import pytest
import torch
from tiny_models import CLIP_VISION, LLAMA, make_data, make_experts, word_tokenizer

from featcal import FeatCalConfig, __version__
from featcal.cli import _log_to_stderr, _LogFormat, main
from featcal.data import save_calibration_file
from featcal.io.atomic_file import umask
from featcal.io.lazy_checkpoint import LazyCheckpoint


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """base/, math/, code/ (tiny CLIP vision), merged/ (their Task Arithmetic) and data files."""
    root = tmp_path_factory.mktemp("safety")
    base = CLIP_VISION.build(0)
    base.save_pretrained(root / "base")
    (root / "base" / "preprocessor_config.json").write_text('{"size": 32}')
    experts = dict(zip(["math", "code"], make_experts(base, 2).values()))
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    for task, batches in make_data(CLIP_VISION, list(experts)).items():
        save_calibration_file(
            root / f"{task}.safetensors", {"pixel_values": torch.cat([b["pixel_values"] for b in batches])}
        )
    assert (
        main(
            [
                "merge",
                "--base",
                str(root / "base"),
                "--experts",
                *_experts(root),
                "--out",
                str(root / "merged"),
            ]
        )
        == 0
    )
    return root


def _experts(root, names=("math", "code")):
    return [f"{t}={root / t}" for t in names]


def _data(root):
    return [f"{t}={root / f'{t}.safetensors'}" for t in ("math", "code")]


def _refused(capsys, args, message, *absent):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    for path in absent:
        assert not path.exists(), path
    assert not [p for p in absent[0].parent.glob(f".{absent[0].name}*")] if absent else True
    return err


@pytest.mark.parametrize("method", ["ta", "ties"])
def test_merge_refuses_a_truncated_expert(disk, tmp_path, capsys, method):
    cut = tmp_path / "cut"
    shutil.copytree(disk / "code", cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    args = [
        "merge",
        "--method",
        method,
        "--base",
        str(disk / "base"),
        "--experts",
        f"code={cut}",
        "--out",
        str(out),
    ]
    _refused(capsys, args, str(weights), out)


def test_merge_refuses_a_nan_expert(disk, tmp_path, capsys):
    bad = CLIP_VISION.build(0)
    with torch.no_grad():
        bad.encoder.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    args = ["merge", "--base", str(disk / "base"), "--experts", f"math={tmp_path / 'nan'}", "--out", str(out)]
    _refused(
        capsys, args, "expert 'math': tensor 'encoder.layers.0.self_attn.q_proj.weight' holds 1 NaN", out
    )


def test_out_inside_or_equal_to_an_input_is_refused(disk, capsys):
    merged = disk / "merged"
    before = {k: v.clone() for k, v in LazyCheckpoint(merged).read(LazyCheckpoint(merged).keys()).items()}
    args = ["calibrate", "--merged", str(merged), "--base", str(disk / "base"), "--experts", *_experts(disk)]
    _refused(
        capsys,
        [*args, "--data", *_data(disk), "--out", str(merged), "--overwrite"],
        f"--out {merged} is the merged model",
    )
    after = LazyCheckpoint(merged).read(LazyCheckpoint(merged).keys())
    assert all(torch.equal(before[k], after[k]) for k in before)
    inside = disk / "base" / "merged-again"
    merge = ["merge", "--base", str(disk / "base"), "--experts", *_experts(disk), "--out", str(inside)]
    _refused(capsys, merge, f"--out {inside} lies inside the base model", inside)


def test_a_missing_local_path_is_not_a_hub_id(disk, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(disk)
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a hub lookup was tried")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    out = tmp_path / "out"
    for missing in ("math/nope", "./nope", "/nonexistent/model"):
        args = ["merge", "--base", "base", "--experts", f"math={missing}", "--out", str(out)]
        _refused(capsys, args, f"no such checkpoint directory: {missing}", out)


def test_merged_bin_checkpoint_keeps_its_tokenizer_files(tmp_path, capsys):
    """A merged model saved as pytorch_model.bin is loaded whole; its output still carries the
    merged directory's files that are not weights."""
    base = LLAMA.build(0).float()
    base.save_pretrained(tmp_path / "base")
    experts = dict(zip(["math", "code"], make_experts(base, 2).values()))
    for task, expert in experts.items():
        expert.save_pretrained(tmp_path / task)
    merged = tmp_path / "merged"
    experts["math"].save_pretrained(merged)  # then its weights as a legacy pickle, read with weights_only
    torch.save(experts["math"].state_dict(), merged / "pytorch_model.bin")
    (merged / "model.safetensors").unlink()
    word_tokenizer().save_pretrained(merged)
    (merged / "README.md").write_text("# my merge\n")
    for task, batches in make_data(LLAMA, ["math", "code"]).items():
        save_calibration_file(
            tmp_path / f"{task}.safetensors", {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        )
    out = tmp_path / "out"
    args = [
        "calibrate",
        "--merged",
        str(merged),
        "--base",
        str(tmp_path / "base"),
        "--experts",
        *_experts(tmp_path),
    ]
    assert main([*args, "--data", *_data(tmp_path), "--out", str(out), "--quiet"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (merged / name).read_bytes()
    # a module's own card stays behind (a merge built in memory carries its base's name_or_path)
    assert (out / "README.md").read_text().startswith("## FeatCal calibration")
    assert list(out.glob("*.safetensors")) and not (out / "pytorch_model.bin").exists()
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask()
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask() for p in out.iterdir())


def test_merge_output_has_the_usual_modes(disk):
    for path in [disk / "merged", *(disk / "merged").iterdir()]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask()
        assert path.stat().st_mode & 0o777 == want, path


def test_demo_refuses_an_existing_out(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = _refused(
        capsys, ["demo", "--quick", "--out", str(out)], f"output directory {out} exists; pass --overwrite"
    )
    assert (out / "mine.txt").read_text() == "keep me" and "Traceback" not in err


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"featcal {__version__}"
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = FeatCalConfig()
    for option, value in [
        ("--lambda-ratio", defaults.lambda_ratio),
        ("--anchor-blend-rho", defaults.anchor_blend_rho),
        ("--teacher-interp-alpha", defaults.teacher_interp_alpha),
        ("--min-expert-tokens", defaults.min_expert_tokens),
        ("--batch-size", 16),
    ]:
        at = text.rindex(f"{option} ")
        assert f"(default: {value})" in text[at : at + 300], option
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "(default: global)" in " ".join(capsys.readouterr().out.split())


def test_info_lines_are_plain_and_warnings_marked():
    _log_to_stderr()
    log = logging.getLogger("featcal")
    assert log.getEffectiveLevel() == logging.INFO
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_LogFormat())
    log.addHandler(handler)
    try:
        log.info("compiled featcal._C in 3 s")
        log.warning("something is off")
        logging.getLogger("transformers.x").warning("theirs")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "featcal: compiled featcal._C in 3 s",
        "featcal: warning: something is off",
    ]
    record = logging.LogRecord("transformers.x", logging.WARNING, "", 0, "theirs", None, None)
    assert _LogFormat().format(record) == "transformers.x: warning: theirs"


def test_a_hub_model_keeps_the_files_of_its_cached_snapshot(tmp_path, monkeypatch):
    """A merged model loaded by hub id is saved with the tokenizer, processor and generation files
    of the hub cache's snapshot of it."""
    import huggingface_hub.constants

    from featcal.io.block_files import ModuleOutput

    repo = tmp_path / "hub" / "models--org--merged"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name, text in [
        ("tokenizer.json", "{}"),
        ("chat_template.jinja", "{{ x }}"),
        ("README.md", "# hub card\n"),
    ]:
        (snapshot / name).write_text(text)
    (snapshot / "model.safetensors").write_bytes(b"not copied")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = CLIP_VISION.build(0)
    model.name_or_path = "org/merged"
    out = ModuleOutput(model, [], tmp_path / "out")
    out.finish()
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_text() == (snapshot / name).read_text()
    assert not (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != b"not copied"


def test_resolve_names_the_local_directory_and_takes_hf_ids(tmp_path, monkeypatch):
    from featcal import FeatCalError
    from featcal.io.checkpoint import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()
    with pytest.raises(FeatCalError, match="there is a local directory openai.*give hf:openai/clip"):
        resolve("openai/clip")
    assert resolve("hf:openai/clip") == "openai/clip"
    assert resolve("other/clip") == "other/clip" and resolve("gpt2") == "gpt2"


def test_out_holding_an_input_is_refused(disk, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(disk / "merged", runs / "merged")
    args = [
        "calibrate",
        "--merged",
        str(runs / "merged"),
        "--base",
        str(disk / "base"),
        "--experts",
        *_experts(disk),
    ]
    assert main([*args, "--data", *_data(disk), "--out", str(runs), "--overwrite"]) == 2
    assert f"--out {runs} holds the merged model" in capsys.readouterr().err
    assert (runs / "merged" / "config.json").is_file()
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(disk / "math.safetensors", data / "math.safetensors")
    shutil.copy(disk / "code.safetensors", data / "code.safetensors")
    files = [f"math={data / 'math.safetensors'}", f"code={data / 'code.safetensors'}"]
    assert (
        main(
            [*args[:2], str(disk / "merged"), *args[3:], "--data", *files, "--out", str(data), "--overwrite"]
        )
        == 2
    )
    assert f"--out {data} holds the data file of task 'math'" in capsys.readouterr().err
    assert (data / "math.safetensors").is_file()


def test_an_expert_path_with_a_colon(tmp_path):
    from featcal.cli import _weighted

    (tmp_path / "step:100").mkdir()
    assert _weighted([f"a={tmp_path}/step:100", f"b={tmp_path}/x:0.5", "c=org/name"]) == (
        {"a": f"{tmp_path}/step:100", "b": f"{tmp_path}/x", "c": "org/name"},
        {"b": 0.5},
    )
