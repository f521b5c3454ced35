"""LazyCheckpoint reads shapes and dtypes from headers alone and tensors one shard at a time.

Checkpoints here are written with safetensors directly (or byte by byte), not with featcal's writer.
"""

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

import featcal.io.lazy_checkpoint as lazy
from featcal.errors import FeatCalError
from featcal.io.lazy_checkpoint import LazyCheckpoint


def _tensors(seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}w32": torch.randn(3, 5, generator=gen),
        f"{prefix}w16": torch.randn(4, generator=gen).half(),
        f"{prefix}wbf": torch.randn(2, 3, 2, generator=gen).bfloat16(),
        f"{prefix}ids": torch.randint(-(2**40), 2**40, (6,), generator=gen),
    }


def _sharded(root, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Save `shards` as model-0000i-of-0000n.safetensors with a hand-written index; all tensors."""
    weight_map, everything = {}, {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, root / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        everything.update(tensors)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return everything


def _raw_file(file, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written byte by byte, its header listing `tensors` in the order given."""
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": codes[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_single_file_shapes_dtypes_and_nbytes_from_header(tmp_path):
    tensors = _tensors(0)
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.path == tmp_path and sorted(ckpt.keys()) == sorted(tensors)
    for name, t in tensors.items():
        assert name in ckpt
        assert ckpt.shape(name) == tuple(t.shape)
        assert ckpt.dtype(name) == t.dtype
        assert ckpt.nbytes([name]) == t.numel() * t.element_size()
        assert ckpt.shard_of(name) == "model.safetensors"
    assert ckpt.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert "missing" not in ckpt
    got = ckpt.read(tensors)
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in tensors.items())


def test_sharded_layout_reads_every_tensor_exactly(tmp_path):
    tensors = _sharded(tmp_path, [_tensors(1, "a."), _tensors(2, "b."), _tensors(3, "c.")])
    ckpt = LazyCheckpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(tensors)
    assert ckpt.shard_of("b.wbf") == "model-00002-of-00003.safetensors"
    assert ckpt.nbytes(["a.w32", "c.ids"]) == 3 * 5 * 4 + 6 * 8
    got = ckpt.read(ckpt.keys(), device="cpu")
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].device.type == "cpu"
        assert torch.equal(got[name], t)


def test_keys_follow_shard_order_then_header_order(tmp_path):
    first, second = _tensors(4), _tensors(5)
    _raw_file(tmp_path / "s2.safetensors", {"z": first["w32"], "a": first["ids"], "m": first["w16"]})
    _raw_file(tmp_path / "s1.safetensors", {"y": second["wbf"], "b": second["w32"]})
    weight_map = {"a": "s2.safetensors", "b": "s1.safetensors", "m": "s2.safetensors"}
    weight_map |= {"y": "s1.safetensors", "z": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.keys() == ["y", "b", "z", "a", "m"]
    assert torch.equal(ckpt.read(["m"])["m"], first["w16"])
    assert torch.equal(ckpt.read(["y"])["y"], second["wbf"])


def test_read_returns_keys_in_the_order_asked(tmp_path):
    _sharded(tmp_path, [_tensors(6, "a."), _tensors(7, "b.")])
    order = ["b.ids", "a.w32", "b.w16", "a.ids", "b.w32"]
    assert list(LazyCheckpoint(tmp_path).read(order)) == order
    assert list(LazyCheckpoint(tmp_path).read(iter(order[::-1]))) == order[::-1]


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), torch.device("cpu", 0)])
def test_read_casts_to_dtype(tmp_path, device):
    tensors = _tensors(8)
    save_file(tensors, tmp_path / "model.safetensors")
    got = LazyCheckpoint(tmp_path).read(["wbf", "w16", "w32"], device=device, dtype=torch.float32)
    for name in got:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        assert torch.equal(got[name], tensors[name].float())


def test_read_opens_one_shard_at_a_time(tmp_path, monkeypatch):
    tensors = _sharded(tmp_path, [_tensors(9, "a."), _tensors(10, "b."), _tensors(11, "c.")])
    real_open, state = lazy.safe_open, {"open": 0, "opened": []}

    class CountingOpen:
        def __init__(self, file, framework, device="cpu"):
            assert framework == "pt" and device == "cpu"
            self.handle = real_open(file, framework=framework, device=device)
            state["opened"].append(str(file).rsplit("/", 1)[-1])

        def __enter__(self):
            state["open"] += 1
            assert state["open"] == 1, "two shards open at once"
            return self.handle.__enter__()

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.handle.__exit__(*exc)

    ckpt = LazyCheckpoint(tmp_path)
    monkeypatch.setattr(lazy, "safe_open", CountingOpen)
    # Interleaved across shards: still each shard is opened once.
    got = ckpt.read(["c.w32", "a.w32", "c.ids", "b.wbf", "a.ids"], device=torch.device("cpu"))
    assert state["opened"] == [f"model-0000{i}-of-00003.safetensors" for i in (3, 1, 2)]
    assert state["open"] == 0
    assert all(torch.equal(t, tensors[k]) for k, t in got.items())


def test_construction_reads_headers_only(tmp_path, monkeypatch):
    _sharded(tmp_path, [_tensors(12, "a."), _tensors(13, "b.")])

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read during construction")

    monkeypatch.setattr(lazy, "safe_open", refuse)
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.shape("b.wbf") == (2, 3, 2) and ckpt.dtype("a.ids") == torch.int64


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch has no float8")
def test_float8_dtype(tmp_path):
    t = torch.randn(8, generator=torch.Generator().manual_seed(14)).to(torch.float8_e4m3fn)
    save_file({"q": t}, tmp_path / "model.safetensors")
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.dtype("q") == torch.float8_e4m3fn and ckpt.nbytes() == 8
    assert torch.equal(ckpt.read(["q"])["q"].view(torch.uint8), t.view(torch.uint8))


def test_holds_safetensors(tmp_path):
    assert not LazyCheckpoint.holds_safetensors(tmp_path)
    assert not LazyCheckpoint.holds_safetensors(tmp_path / "nowhere")
    save_file(_tensors(15), tmp_path / "model.safetensors")
    assert LazyCheckpoint.holds_safetensors(tmp_path)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _sharded(sharded, [_tensors(16)])
    assert LazyCheckpoint.holds_safetensors(str(sharded))


# Errors


def test_missing_directory(tmp_path):
    with pytest.raises(FeatCalError, match="nowhere does not exist"):
        LazyCheckpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatCalError, match="file is not a directory"):
        LazyCheckpoint(tmp_path / "file")


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FeatCalError, match="featcal reads safetensors checkpoints") as err:
        LazyCheckpoint(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_index_names_a_missing_shard(tmp_path):
    _sharded(tmp_path, [_tensors(17, "a."), _tensors(18, "b.")])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FeatCalError, match="references shard model-00002-of-00002.safetensors, which does not"
    ):
        LazyCheckpoint(tmp_path)


def test_index_lists_a_tensor_its_shard_lacks(tmp_path):
    _sharded(tmp_path, [_tensors(19, "a."), _tensors(20, "b.")])
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["a.ghost"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(FeatCalError, match="tensor 'a.ghost' in model-00001-of-00002.safetensors, but"):
        LazyCheckpoint(tmp_path)
    # Listed under the wrong shard.
    del index["weight_map"]["a.ghost"]
    index["weight_map"]["a.w32"] = "model-00002-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(FeatCalError, match="'a.w32' in model-00002-of-00002.safetensors, but") as err:
        LazyCheckpoint(tmp_path)
    assert "(model-00001-of-00002.safetensors holds it)" in str(err.value)


def test_tensor_in_two_shards(tmp_path):
    _sharded(tmp_path, [_tensors(21), _tensors(22, "b.") | {"w16": torch.zeros(4).half()}])
    with pytest.raises(
        FeatCalError, match="'w16' is in both model-00001-of-00002.safetensors and model-00002"
    ):
        LazyCheckpoint(tmp_path)


def test_shard_holds_a_tensor_the_index_omits(tmp_path):
    _sharded(tmp_path, [_tensors(23, "a."), _tensors(24, "b.")])
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["b.ids"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(FeatCalError, match="model-00002-of-00002.safetensors holds tensor 'b.ids', not in"):
        LazyCheckpoint(tmp_path)


def test_corrupt_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FeatCalError, match="model.safetensors.index.json is not a valid safetensors index"):
        LazyCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(FeatCalError, match="not a valid safetensors index"):
        LazyCheckpoint(tmp_path)


def _good_bytes() -> bytes:
    t = torch.arange(6, dtype=torch.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}).encode()
    return struct.pack("<Q", len(header)) + header + t.numpy().tobytes()


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x01\x02", "shorter than the 8-byte"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds the file size"),
        (struct.pack("<Q", 6) + b"{oops}", "corrupt"),
        (struct.pack("<Q", 2) + b"[]", "corrupt"),
        (_good_bytes()[:-4], "past the end of the file"),
        (_good_bytes().replace(b"[0, 24]", b"[24, 0]"), "bad entry for tensor 'x'"),
        (_good_bytes().replace(b'"shape"', b'"shap_"'), "corrupt"),
    ],
)
def test_corrupt_or_truncated_header_names_the_file(tmp_path, content, problem):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(FeatCalError, match="corrupt or truncated safetensors header in") as err:
        LazyCheckpoint(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(err.value) and problem in str(err.value)


def test_good_raw_file_is_accepted(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(_good_bytes())
    assert torch.equal(LazyCheckpoint(tmp_path).read(["x"])["x"], torch.arange(6, dtype=torch.float32))


def test_unknown_key_names_key_and_checkpoint(tmp_path, monkeypatch):
    save_file({"model.layers.0.mlp.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    ckpt = LazyCheckpoint(tmp_path)
    with pytest.raises(
        FeatCalError, match=re.escape(f"no tensor 'layers.0.mlp.weight' in checkpoint {tmp_path}")
    ) as err:
        ckpt.shape("layers.0.mlp.weight")
    assert "did you mean 'model.layers.0.mlp.weight'" in str(err.value)
    with pytest.raises(FeatCalError, match="did you mean 'model.layers.0.mlp.weight'"):
        ckpt.dtype("model.layers.0.mlp.weights")
    with pytest.raises(FeatCalError, match="no tensor 'lm_head.weight'") as err:
        ckpt.nbytes(["lm_head.weight"])
    assert "did you mean" not in str(err.value)
    # read checks every key before opening any shard.
    monkeypatch.setattr(lazy, "safe_open", None)
    with pytest.raises(FeatCalError, match="no tensor 'bias'"):
        ckpt.read(["model.layers.0.mlp.weight", "bias"])


def test_unsupported_dtype_is_named_when_asked(tmp_path):
    header = json.dumps({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.shape("x") == (4,) and ckpt.nbytes() == 2
    with pytest.raises(FeatCalError, match="tensor 'x' in .*model.safetensors has dtype F4"):
        ckpt.dtype("x")
