"""`featcal data`: calibration files from local json, csv, parquet files and image folders, made
with a tiny tokenizer and image processor built here (nothing is downloaded)."""

import io
import json
import logging
import random
import string
import subprocess
import sys
import tempfile

import pytest

datasets = pytest.importorskip("datasets")

import pyarrow as pa  # noqa: E402
import pyarrow.csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import CLIP_VISION, LLAMA, make_experts  # noqa: E402
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast  # noqa: E402

from featcal import task_arithmetic  # noqa: E402
from featcal.cli import main  # noqa: E402
from featcal.errors import FeatCalError  # noqa: E402
from featcal.io.dataset_files import build_calibration_data  # noqa: E402

POSITIONS = 64  # LLAMA's max_position_embeddings


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __contains__(self, text):
        return any(text in message for message in self.messages)


@pytest.fixture(autouse=True)
def warnings_logged():
    """The warnings featcal.io.dataset_files logs."""
    handler = _Messages()
    logging.getLogger("featcal.io.dataset_files").addHandler(handler)
    yield handler
    logging.getLogger("featcal.io.dataset_files").removeHandler(handler)


def _fresh_random() -> random.Random:
    seed = random.SystemRandom().randrange(2**32)
    print(f"random inputs from seed {seed}")  # shown when the test fails
    return random.Random(seed)


@pytest.fixture
def rng():
    return _fresh_random()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(root with base/, task0/, task1/, merged/ of a tiny Llama, the base holding a word-level
    tokenizer with an eos and no pad token; the raw tokenizer; its vocabulary of words)."""
    root, rng = tmp_path_factory.mktemp("llama"), _fresh_random()
    words = set()
    while len(words) < 40:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7))))
    words = sorted(words)
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    base = LLAMA.build(0)
    experts = make_experts(base, 2)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    task_arithmetic(base, experts, 0.3).save_pretrained(root / "merged")
    return root, raw, words


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    """(root with base/, task0/, task1/, merged/ of a tiny CLIP vision model, the base with a
    32-pixel CLIP image processor; that processor)."""
    root = tmp_path_factory.mktemp("clip")
    base = CLIP_VISION.build(0)
    experts = make_experts(base, 2)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
    task_arithmetic(base, experts, 0.3).save_pretrained(root / "merged")
    return root, processor


def _texts(rng, words, count, lengths=(2, 24)) -> list[str]:
    """`count` distinct rows of random words."""
    texts = set()
    while len(texts) < count:
        texts.add(" ".join(rng.choices(words, k=rng.randint(*lengths))))
    return sorted(texts, key=lambda _: rng.random())


def _write(path, columns: dict[str, list]):
    """A table of columns as json lines, csv or parquet, after the path's suffix."""
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pa.csv.write_csv(pa.table(columns), path)
    else:
        pq.write_table(pa.table(columns), path)
    return path


def _data(argv, model, out, *extra) -> dict:
    """Run `featcal data` and read what it wrote."""
    assert main(["data", "--model", str(model), *map(str, argv), "--out", str(out), "--quiet", *extra]) == 0
    return load_file(out)


def _chosen_texts(inputs, raw, texts) -> list[str]:
    """The rows of `texts` the output holds, in its order (each output row's real tokens must be
    one row's tokens, no row twice)."""
    by_tokens = {tuple(raw.encode(text).ids): text for text in texts}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    chosen = [by_tokens.get(tuple(ids[i][mask[i].bool()].tolist())) for i in range(len(ids))]
    assert None not in chosen and len(set(chosen)) == len(chosen)
    return chosen


def _expected_tokens(raw, texts, limit) -> dict:
    """Right-padded with eos (the tokenizer has no pad token) to the longest row, cut at `limit`."""
    rows = [raw.encode(text).ids[:limit] for text in texts]
    width, eos = max(map(len, rows)), raw.token_to_id("</s>")
    ids = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_text_rows_are_drawn_by_seed_and_tokenized(text_model, rng, tmp_path, capsys, suffix):
    root, raw, words = text_model
    texts = _texts(rng, words, 30)
    data = _write(tmp_path / f"rows{suffix}", {"text": texts, "n": list(range(30))})
    first = _data([data], root / "base", tmp_path / "a.safetensors", "--samples", "12", "--seed", "3")
    assert (
        f"wrote 12 examples of text ({int(first['attention_mask'].sum()):,} tokens" in capsys.readouterr().out
    )
    chosen = _chosen_texts(first, raw, texts)
    want = _expected_tokens(raw, chosen, 512)
    assert first.keys() == want.keys()
    for key in want:
        assert torch.equal(first[key], want[key]), key

    again = _data([data], root / "base", tmp_path / "b.safetensors", "--samples", "12", "--seed", "3")
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = _data([data], root / "base", tmp_path / "c.safetensors", "--samples", "12", "--seed", "4")
    assert set(_chosen_texts(other, raw, texts)) != set(chosen)


def test_rows_are_cut_at_max_length_and_at_the_models_positions(text_model, rng, tmp_path, warnings_logged):
    root, raw, words = text_model
    texts = _texts(rng, words, 20, lengths=(6, 24))
    data = _write(tmp_path / "rows.jsonl", {"text": texts})
    full = _data([data], root / "base", tmp_path / "full.safetensors", "--samples", "8")
    short = _data(
        [data], root / "base", tmp_path / "short.safetensors", "--samples", "8", "--max-length", "5"
    )
    assert short["input_ids"].shape == (8, 5) and short["attention_mask"].all()
    assert torch.equal(short["input_ids"], full["input_ids"][:, :5])

    long_rows = _texts(rng, words, 3, lengths=(POSITIONS + 5, POSITIONS + 40))
    data = _write(tmp_path / "long.jsonl", {"text": long_rows})
    cut = _data([data], root / "base", tmp_path / "cut.safetensors", "--max-length", "100")
    assert f"3 of the rows are cut at {POSITIONS} tokens, the most model" in warnings_logged
    assert torch.equal(cut["input_ids"], _expected_tokens(raw, long_rows, POSITIONS)["input_ids"])


def test_column_files_and_left_out_rows(text_model, rng, tmp_path, warnings_logged):
    root, raw, words = text_model
    texts, bodies = _texts(rng, words, 6), _texts(rng, words, 6)
    first = _write(tmp_path / "a.jsonl", {"text": texts, "body": bodies})
    second = tmp_path / "b.jsonl"
    more = _texts(rng, words, 4)
    rows = [{"text": t, "body": b} for t, b in zip(more, _texts(rng, words, 4))]
    rows += [{"text": None, "body": "x"}, {"text": "  ", "body": "y"}]
    second.write_text("".join(json.dumps(row) + "\n" for row in rows))

    got = _data([first], root / "base", tmp_path / "body.safetensors", "--column", "body", "--samples", "6")
    assert set(_chosen_texts(got, raw, bodies)) == set(bodies)

    assert not warnings_logged.messages
    got = _data([first, second], root / "base", tmp_path / "both.safetensors")
    assert set(_chosen_texts(got, raw, texts + more)) == set(texts + more)
    assert f"left out 2 of the 6 rows of {second}" in warnings_logged
    assert "only 10 usable row(s), fewer than the 128 samples" in warnings_logged


def _image(rng, mode="RGB") -> Image.Image:
    size = (rng.randint(20, 48), rng.randint(20, 48))
    pixels = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode)))
    return Image.frombytes(mode, size, pixels)


def _chosen_images(pixels, processor, images) -> list[int]:
    """Which of `images` the output's rows are, in its order."""
    want = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    chosen = []
    for row in pixels:
        hits = [i for i, w in enumerate(want) if torch.allclose(row, w, atol=1e-6)]
        assert len(hits) == 1
        chosen.append(hits[0])
    assert len(set(chosen)) == len(chosen)
    return chosen


def test_image_folder_through_the_image_processor(vision_model, rng, tmp_path, capsys):
    root, processor = vision_model
    folder, images = tmp_path / "images", []
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i, mode in enumerate(["RGB", "RGB", "RGB", "L", "RGBA"]):
            images.append(_image(rng, mode))
            images[-1].save(folder / label / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")

    got = _data([folder], root / "base", tmp_path / "a.safetensors", "--samples", "6", "--seed", "1")
    assert got.keys() == {"pixel_values"} and got["pixel_values"].shape == (6, 3, 32, 32)
    assert "wrote 6 images (3x32x32)" in capsys.readouterr().out
    chosen = _chosen_images(got["pixel_values"], processor, images)
    again = _data([folder], root / "base", tmp_path / "b.safetensors", "--samples", "6", "--seed", "1")
    assert torch.equal(again["pixel_values"], got["pixel_values"])
    other = _data([folder], root / "base", tmp_path / "c.safetensors", "--samples", "6", "--seed", "2")
    assert set(_chosen_images(other["pixel_values"], processor, images)) != set(chosen)

    files = [folder / "cat" / "3.png", folder / "dog" / "0.png"]
    got = _data(files, root / "base", tmp_path / "files.safetensors")
    assert sorted(_chosen_images(got["pixel_values"], processor, images)) == [3, 5]


def test_parquet_image_column(vision_model, rng, tmp_path):
    root, processor = vision_model
    images = [_image(rng) for _ in range(4)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"picture": encoded, "caption": list("abcd")}, features=features)
    table.to_parquet(tmp_path / "images.parquet")
    got = _data(
        [tmp_path / "images.parquet"], root / "base", tmp_path / "out.safetensors", "--column", "picture"
    )
    assert sorted(_chosen_images(got["pixel_values"], processor, images)) == [0, 1, 2, 3]


def _calibrate(root, data: dict, out) -> list[str]:
    args = ["calibrate", "--base", str(root / "base"), "--merged", str(root / "merged"), "--out", str(out)]
    args += ["--quiet", "--batch-size", "4", "--experts", *[f"{t}={root / t}" for t in data]]
    return args + ["--data", *[f"{t}={p}" for t, p in data.items()]]


def test_calibrate_takes_the_files(text_model, vision_model, rng, tmp_path):
    root, _, words = text_model
    data = {}
    for task in ("task0", "task1"):
        rows = _write(tmp_path / f"{task}.jsonl", {"text": _texts(rng, words, 10)})
        data[task] = tmp_path / f"{task}-text.safetensors"
        _data([rows], root / "base", data[task], "--samples", "8", "--max-length", "16")
    assert main(_calibrate(root, data, tmp_path / "llama")) == 0
    report = json.loads((tmp_path / "llama" / "featcal_report.json").read_text())
    for task, path in data.items():  # calibrated on every real token of the file
        assert report["tasks"][task]["tokens"] == int(load_file(path)["attention_mask"].sum())

    root, _ = vision_model
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        _image(rng).save(folder / f"{i}.png")
    for task, seed in (("task0", "0"), ("task1", "1")):
        data[task] = tmp_path / f"{task}-images.safetensors"
        _data([folder], root / "base", data[task], "--samples", "4", "--seed", seed)
    assert main(_calibrate(root, data, tmp_path / "clip")) == 0
    assert (tmp_path / "clip" / "featcal_report.json").is_file()


def _digits_blind_tokenizer(text_root, words) -> PreTrainedTokenizerFast:
    """A tokenizer whose normalizer drops digits: a row of digits has no tokens."""
    raw = Tokenizer(
        models.WordLevel({"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "[UNK]")
    )
    raw.normalizer = normalizers.Replace(Regex("[0-9]"), "")
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")


def _error_cases(text_root, vision_root, tmp_path, rng, words) -> dict:
    """name: (featcal data arguments, a part of the message)."""
    good = _write(tmp_path / "good.jsonl", {"text": _texts(rng, words, 4), "n": [1, 2, 3, 4]})
    text, vision = ["--model", str(text_root / "base")], ["--model", str(vision_root / "base")]
    parquet = _write(tmp_path / "whole.parquet", {"text": _texts(rng, words, 50)}).read_bytes()
    (tmp_path / "cut.parquet").write_bytes(parquet[: len(parquet) // 2])
    lines = good.read_text().splitlines()
    (tmp_path / "broken.jsonl").write_text("\n".join([lines[0], lines[1][:-3], *lines[2:]]) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("text,n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "a.txt").write_text("x")
    _write(tmp_path / "numbers.jsonl", {"text": [1, 2]})
    (tmp_path / "mixed.jsonl").write_text('{"text": "a b"}\n{"text": 3}\n')
    _write(tmp_path / "nulls.jsonl", {"text": [None, " "]})
    (tmp_path / "rows.txt").write_text("a b\n")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((text_root / "base" / "config.json").read_text())
    (tmp_path / "bare-vision").mkdir()
    (tmp_path / "bare-vision" / "config.json").write_text((vision_root / "base" / "config.json").read_text())
    (tmp_path / "pictures").mkdir()
    _image(rng).save(tmp_path / "pictures" / "0.png")
    (tmp_path / "pictures" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "exists.safetensors").write_bytes(b"mine")
    _digits_blind_tokenizer(text_root, words).save_pretrained(tmp_path / "digits-blind")
    (tmp_path / "digits-blind" / "config.json").write_text((text_root / "base" / "config.json").read_text())
    _write(tmp_path / "digits.jsonl", {"text": ["12 345"]})
    t = str(tmp_path)
    return {
        "missing file": ([*text, f"{t}/nowhere.jsonl"], f"no such data file: {t}/nowhere.jsonl"),
        "unknown suffix": ([*text, f"{t}/rows.txt"], f"cannot tell the format of {t}/rows.txt"),
        "cut parquet": (
            [*text, f"{t}/cut.parquet"],
            f"could not read {t}/cut.parquet as parquet: ArrowInvalid",
        ),
        "broken json": (
            [*text, f"{t}/broken.jsonl"],
            f"could not read {t}/broken.jsonl as json: ",
        ),
        "missing column": (
            [*text, str(good), "--column", "body"],
            "has no column 'body'; its columns: text, n",
        ),
        "empty json": ([*text, f"{t}/empty.jsonl"], f"{t}/empty.jsonl holds no rows"),
        "empty csv": ([*text, f"{t}/header.csv"], f"{t}/header.csv holds no rows"),
        "empty parquet": ([*text, f"{t}/empty.parquet"], f"{t}/empty.parquet holds no rows"),
        "empty folder": ([*vision, f"{t}/no-images"], f"{t}/no-images holds no images"),
        "no text at all": ([*text, f"{t}/nulls.jsonl"], f"column 'text' of {t}/nulls.jsonl holds no values"),
        "numbers": ([*text, f"{t}/numbers.jsonl"], "holds int64 values, neither text nor images"),
        "mixed values": ([*text, f"{t}/mixed.jsonl"], "holds values of mixed types, neither text nor images"),
        "non-text column": ([*text, str(good), "--column", "n"], "column 'n' of"),
        "missing model": (["--model", f"{t}/no-model", str(good)], f"no such model directory: {t}/no-model"),
        "no tokenizer": (["--model", f"{t}/bare", str(good)], f"model {t}/bare has no tokenizer"),
        "no image processor": (
            ["--model", f"{t}/bare-vision", f"{t}/pictures"],
            f"model {t}/bare-vision has no image processor",
        ),
        "text for a vision model": (
            [*vision, str(good)],
            "(CLIPVisionConfig) takes images, but column 'text'",
        ),
        "images for a text model": ([*text, f"{t}/pictures"], "(LlamaConfig) takes text, but column 'image'"),
        "broken image": ([*vision, f"{t}/pictures"], f"could not read image {t}/pictures/1.png"),
        "no tokens": (
            ["--model", f"{t}/digits-blind", f"{t}/digits.jsonl"],
            f"row 0 of {t}/digits.jsonl has no tokens under the tokenizer of model {t}/digits-blind",
        ),
        "no samples": ([*text, str(good), "--samples", "0"], "samples must be >= 1, got 0"),
        "no length": ([*text, str(good), "--max-length", "0"], "max length must be >= 1, got 0"),
    }


def test_errors_are_named_and_leave_no_output(text_model, vision_model, rng, tmp_path, capsys):
    text_root, _, words = text_model
    cases = _error_cases(text_root, vision_model[0], tmp_path, rng, words)
    before = sorted(tmp_path.iterdir())
    for name, (argv, message) in cases.items():
        out = tmp_path / "out.safetensors"
        assert main(["data", *argv, "--out", str(out), "--quiet"]) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("featcal: error: ")]
        assert len(errors) == 1 and message in errors[0], (name, err)
        assert "Traceback" not in err and sorted(tmp_path.iterdir()) == before, name

    good = ["--model", str(text_root / "base"), str(tmp_path / "good.jsonl")]
    exists = tmp_path / "exists.safetensors"
    assert main(["data", *good, "--out", str(exists)]) == 2
    assert f"{exists} exists; pass --overwrite" in capsys.readouterr().err and exists.read_bytes() == b"mine"
    assert main(["data", *good, "--out", str(tmp_path / "good.jsonl"), "--overwrite"]) == 2
    assert "is one of the input files" in capsys.readouterr().err
    assert main(["data", *good, "--out", str(tmp_path / "bare"), "--overwrite"]) == 2
    assert f"--out {tmp_path / 'bare'} is a directory" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before
    assert main(["data", *good, "--out", str(exists), "--overwrite", "--quiet"]) == 0
    assert load_file(exists)["input_ids"].shape[0] == 4


def test_library_checks_and_missing_datasets(text_model, tmp_path, monkeypatch, capsys):
    root = text_model[0]
    rows = _write(tmp_path / "rows.jsonl", {"text": ["a b", "c"]})
    with pytest.raises(FeatCalError, match="unknown data format 'xml'"):
        build_calibration_data([rows], root / "base", format="xml")
    with pytest.raises(FeatCalError, match="is a directory; only the imagefolder format"):
        build_calibration_data([tmp_path], root / "base", format="json")
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "out.safetensors"
    assert main(["data", "--model", str(root / "base"), str(rows), "--out", str(out)]) == 2
    assert 'pip install "featcal[data]"' in capsys.readouterr().err and not out.exists()


def test_no_writes_to_the_user_cache(text_model, rng, tmp_path, monkeypatch):
    """datasets reads and writes in a temporary directory, removed after; its own cache stays
    untouched."""
    root, raw, words = text_model
    for name in (
        "HF_DATASETS_CACHE",
        "HF_MODULES_CACHE",
        "DOWNLOADED_DATASETS_PATH",
        "EXTRACTED_DATASETS_PATH",
    ):
        monkeypatch.setattr(datasets.config, name, tmp_path / "user-cache" / name)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    texts = _texts(rng, words, 5)
    got = build_calibration_data(
        [_write(tmp_path / "rows.csv", {"text": texts})], root / "base", progress=False
    )
    assert set(_chosen_texts(got, raw, texts)) == set(texts)
    assert not (tmp_path / "user-cache").exists() and not any((tmp_path / "tmp").iterdir())


def test_help_shows_defaults_and_import_leaves_datasets_alone(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 128)" in help_text and "(default: 512)" in help_text and "(default: 0)" in help_text
    code = "import sys, featcal, featcal.cli; assert 'datasets' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
