"""ShardedWriter writes loadable safetensors checkpoints shard by shard, never a partial file."""

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import featcal.io.sharded_writer as sharded_writer
from featcal.errors import FeatCalError
from featcal.io.lazy_checkpoint import LazyCheckpoint
from featcal.io.sharded_writer import ShardedWriter


def _tensors(seed: int, prefix: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}.w32": torch.randn(4, 3, generator=gen),
        f"{prefix}.wbf": torch.randn(5, generator=gen).bfloat16(),
        f"{prefix}.w16": torch.randn(2, 2, generator=gen).half(),
        f"{prefix}.ids": torch.randint(0, 1000, (7,), generator=gen),
    }


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_shard_names_follow_hugging_face(tmp_path):
    writer = ShardedWriter(tmp_path, 5)
    assert [writer.shard_name(n) for n in (0, 4)] == [
        "model-00001-of-00005.safetensors",
        "model-00005-of-00005.safetensors",
    ]
    assert ShardedWriter(tmp_path, 1).shard_name(0) == "model.safetensors"


def test_three_shards_round_trip(tmp_path):
    shards = [_tensors(seed, f"layer{seed}") for seed in range(3)]
    writer = ShardedWriter(tmp_path / "out", 3)
    for number in (2, 0, 1):  # any order
        writer.write_shard(number, shards[number])
    index = writer.finish()

    out = tmp_path / "out"
    names = [writer.shard_name(n) for n in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    assert index["metadata"] == {"total_size": sum(_nbytes(s) for s in shards)}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert index["weight_map"] == {k: names[n] for n, s in enumerate(shards) for k in s}

    for number, tensors in enumerate(shards):
        loaded = load_file(out / names[number])
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], t) and loaded[k].dtype == t.dtype for k, t in tensors.items())

    ckpt = LazyCheckpoint(out)
    everything = {k: t for s in shards for k, t in s.items()}
    got = ckpt.read(everything)
    assert ckpt.nbytes() == index["metadata"]["total_size"]
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in everything.items())


def test_single_shard_has_no_index(tmp_path):
    tensors = _tensors(3, "x")
    writer = ShardedWriter(tmp_path, 1)
    writer.write_shard(0, tensors)
    index = writer.finish()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert index == {
        "metadata": {"total_size": _nbytes(tensors)},
        "weight_map": dict.fromkeys(sorted(tensors), "model.safetensors"),
    }
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_metadata_defaults_to_format_pt(tmp_path):
    writer = ShardedWriter(tmp_path / "a", 1)
    writer.write_shard(0, {"x": torch.zeros(1)})
    with safe_open(tmp_path / "a" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    writer = ShardedWriter(tmp_path / "b", 1, metadata={"producer": "featcal"})
    writer.write_shard(0, {"x": torch.zeros(1)})
    with safe_open(tmp_path / "b" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "featcal"}


def test_tied_views_and_non_contiguous_tensors(tmp_path):
    gen = torch.Generator().manual_seed(4)
    embed = torch.randn(6, 4, generator=gen)
    fused = torch.randn(9, 4, generator=gen)
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied
        "q.weight": fused[:3],  # contiguous views of one storage
        "k.weight": fused[3:6],
        "fused.weight": fused,
        "transposed": fused.t(),
        "grad": torch.randn(3, generator=gen, requires_grad=True),
    }
    before = {k: t.detach().clone() for k, t in tensors.items()}
    writer = ShardedWriter(tmp_path, 2)
    writer.write_shard(0, tensors)
    writer.write_shard(1, {"other": embed})  # the same storage in another shard needs no copy
    writer.finish()
    got = LazyCheckpoint(tmp_path).read([*tensors, "other"])
    for name, t in before.items():
        assert torch.equal(got[name], t) and torch.equal(tensors[name], t)
    assert torch.equal(got["other"], embed)


def test_no_temporary_files_left(tmp_path):
    writer = ShardedWriter(tmp_path, 2)
    writer.write_shard(0, _tensors(5, "a"))
    assert [p.name for p in tmp_path.iterdir()] == ["model-00001-of-00002.safetensors"]
    writer.write_shard(1, _tensors(6, "b"))
    writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_files_get_the_usual_mode(tmp_path):
    (tmp_path / "plain").write_text("")
    writer = ShardedWriter(tmp_path / "out", 2)
    writer.write_shard(0, {"a": torch.zeros(1)})
    writer.write_shard(1, {"b": torch.zeros(1)})
    writer.finish()
    usual = (tmp_path / "plain").stat().st_mode
    assert {p.stat().st_mode for p in (tmp_path / "out").iterdir()} == {usual}


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    real_save, targets = sharded_writer.save_file, []

    def failing_save(tensors, filename, metadata=None):
        targets.append(filename)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = ShardedWriter(tmp_path, 2)
    monkeypatch.setattr(sharded_writer, "save_file", failing_save)
    message = rf"could not write {tmp_path / 'model-00001-of-00002.safetensors'} \(\d+ B\): No space left"
    with pytest.raises(FeatCalError, match=message + r".*has .* free\. Free some space there"):
        writer.write_shard(0, _tensors(7, "a"))
    assert len(targets) == 1 and targets[0] != tmp_path / "model-00001-of-00002.safetensors"
    assert list(tmp_path.iterdir()) == []

    # Nothing was recorded: the shard can be written again.
    monkeypatch.setattr(sharded_writer, "save_file", real_save)
    writer.write_shard(0, _tensors(7, "a"))
    writer.write_shard(1, _tensors(8, "b"))
    assert len(writer.finish()["weight_map"]) == 8


def test_failed_index_write_leaves_no_file(tmp_path, monkeypatch):
    writer = ShardedWriter(tmp_path, 2)
    writer.write_shard(0, _tensors(9, "a"))
    writer.write_shard(1, _tensors(10, "b"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded_writer.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


# Errors


def test_shard_number_out_of_range(tmp_path):
    writer = ShardedWriter(tmp_path, 3)
    for number in (-1, 3):
        with pytest.raises(FeatCalError, match=f"shard number {number} is out of range 0..2"):
            writer.write_shard(number, {"x": torch.zeros(1)})
    with pytest.raises(FeatCalError, match="num_shards must be at least 1, got 0"):
        ShardedWriter(tmp_path, 0)


def test_shard_written_twice(tmp_path):
    writer = ShardedWriter(tmp_path, 2)
    writer.write_shard(1, {"x": torch.zeros(1)})
    with pytest.raises(FeatCalError, match="shard model-00002-of-00002.safetensors was already written"):
        writer.write_shard(1, {"y": torch.zeros(1)})


def test_tensor_name_in_two_shards(tmp_path):
    writer = ShardedWriter(tmp_path, 3)
    writer.write_shard(0, {"x": torch.zeros(1)})
    with pytest.raises(FeatCalError) as err:
        writer.write_shard(2, {"y": torch.zeros(1), "x": torch.ones(1)})
    message = str(err.value)
    assert "tensor 'x'" in message
    assert "model-00003-of-00003.safetensors" in message and "model-00001-of-00003.safetensors" in message
    assert not (tmp_path / "model-00003-of-00003.safetensors").exists()


def test_finish_with_missing_shards(tmp_path):
    writer = ShardedWriter(tmp_path, 4)
    writer.write_shard(1, {"x": torch.zeros(1)})
    with pytest.raises(
        FeatCalError,
        match="shards not written: model-00001-of-00004.safetensors, model-00003-of-00004.safetensors, "
        "model-00004-of-00004.safetensors",
    ):
        writer.finish()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(FeatCalError, match="metadata must map str to str"):
        ShardedWriter(tmp_path, 1, metadata={"step": 3})


def test_written_checkpoint_loads_with_from_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    names = list(state)
    writer = ShardedWriter(tmp_path, 3)
    for number in range(3):
        writer.write_shard(number, {k: state[k] for k in names[number::3]})
    writer.finish()
    config.save_pretrained(tmp_path)

    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, t in state.items():
        assert loaded_state[name].dtype == t.dtype and torch.equal(loaded_state[name], t), name
