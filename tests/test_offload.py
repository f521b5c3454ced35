"""Streams of hidden states round-trip bit-exactly at every placement, in order, and clean up after."""

import contextlib
import itertools
import os

import pytest
import torch

from featcal.errors import FeatCalError
from featcal.io.offload import PLACEMENTS, Stream

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 7, 16), (4, 7, 16), (3, 5, 16)]  # the last batch is smaller


def _batches(dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for shape in SHAPES]


def _stream(placement, tmp_path, device="cpu", name="stream"):
    return Stream(placement, device, tmp_path / "streams" if placement == "disk" else None, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_round_trip_is_exact(placement, dtype, tmp_path):
    batches = _batches(dtype)
    stream = _stream(placement, tmp_path)
    for b in batches:
        stream.append(b)
    assert len(stream) == len(batches)
    assert stream.shapes() == SHAPES
    assert stream.nbytes == sum(b.numel() * b.element_size() for b in batches)
    iterated = list(stream)
    assert len(iterated) == len(batches)
    for i, b in enumerate(batches):
        for got in (iterated[i], stream[i]):
            assert got.device == torch.device("cpu") and got.dtype == dtype
            assert torch.equal(got, b)
    assert torch.equal(stream[-1], batches[-1])
    stream.close()
    assert len(stream) == 0 and stream.nbytes == 0 and list(stream) == []


def test_non_contiguous_and_grad_inputs_are_stored_as_values(tmp_path):
    x = torch.randn(5, 16, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = x.transpose(0, 1) * 2  # non-contiguous, part of a graph
    for placement in PLACEMENTS:
        stream = _stream(placement, tmp_path)
        stream.append(value)
        assert not stream[0].requires_grad
        assert torch.equal(stream[0], value.detach())
        stream.close()


def test_cpu_placement_copies_on_append(tmp_path):
    value = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    stream = _stream("cpu", tmp_path)
    stream.append(value)
    expected = value.clone()
    value.add_(1)
    assert torch.equal(stream[0], expected)


def test_disk_files_exist_while_open_and_are_deleted_on_close(tmp_path):
    stream = _stream("disk", tmp_path)
    for b in _batches(torch.bfloat16):
        stream.append(b)
    stream.flush()
    files = sorted(os.listdir(tmp_path / "streams"))
    assert len(files) == len(SHAPES) and all(f.startswith("stream.") for f in files)
    sizes = [os.path.getsize(tmp_path / "streams" / f) for f in files]
    assert sizes == [torch.Size(s).numel() * 2 for s in SHAPES]
    assert stream.nbytes == sum(sizes)
    stream.close()
    assert os.listdir(tmp_path / "streams") == []
    stream.close()  # twice is fine


def test_disk_streams_with_different_names_share_a_directory(tmp_path):
    first, second = _stream("disk", tmp_path, name="a"), _stream("disk", tmp_path, name="b")
    a, b = _batches(torch.float32, seed=3), _batches(torch.float16, seed=4)
    for x, y in zip(a, b):
        first.append(x)
        second.append(y)
    assert all(torch.equal(x, y) for x, y in zip(first, a))
    assert all(torch.equal(x, y) for x, y in zip(second, b))
    first.close()
    assert len(os.listdir(tmp_path / "streams")) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(second, b))
    second.close()
    assert os.listdir(tmp_path / "streams") == []


def test_disk_read_on_cpu_is_independent_of_the_file(tmp_path):
    stream = _stream("disk", tmp_path)
    value = _batches(torch.float32)[0]
    stream.append(value)
    first = stream[0]
    first.zero_()
    assert torch.equal(stream[0], value)
    stream.close()
    assert torch.equal(first, torch.zeros_like(value))  # still readable after the file is gone


def test_errors(tmp_path):
    with pytest.raises(FeatCalError, match="'gpu'.*'device', 'cpu', 'disk'"):
        Stream("gpu", "cpu")
    with pytest.raises(FeatCalError, match="directory"):
        Stream("disk", "cpu")
    for placement in PLACEMENTS:
        stream = _stream(placement, tmp_path)
        stream.append(torch.zeros(1, 2, 3))
        for i in (1, -2):
            with pytest.raises(IndexError):
                stream[i]
        stream.close()


@pytest.mark.cuda
@pytest.mark.parametrize("source", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_placement_serves_cuda_from_pinned_memory(dtype, source):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    batches = _batches(dtype)
    stream = Stream("cpu", "cuda")
    for b in batches:
        stream.append(b.to(source))  # a CUDA source is freed (and its memory reused) right after
    assert all(t.is_pinned() and t.device.type == "cpu" for t in stream._tensors)
    for _ in range(2):
        for got, b in zip(stream, batches):
            assert got.is_cuda and torch.equal(got.cpu(), b)
            got.mul_(0)  # fresh device copies: the stored batches are unchanged
    assert all(stream[i].is_cuda and torch.equal(stream[i].cpu(), b) for i, b in enumerate(batches))
    stream.close()


@pytest.mark.cuda
@pytest.mark.parametrize("placement", ["device", "disk"])
def test_device_and_disk_placements_serve_cuda(placement, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    batches = _batches(torch.bfloat16, device="cuda")
    stream = _stream(placement, tmp_path, device="cuda")
    for b in batches:
        stream.append(b)
    for got, b in zip(stream, batches):
        assert got.is_cuda and torch.equal(got, b)
    stream.close()


class FakeStreams:
    """DeviceStreams on CPU tensors that logs every call (every tensor counts as on the device)."""

    def __init__(self):
        self.log, self.active, self._events = [], "compute", itertools.count()

    def current(self):
        return self.active

    def side(self):
        return "side"

    @contextlib.contextmanager
    def use(self, stream):
        before, self.active = self.active, stream
        yield
        self.active = before

    def event(self, stream):
        event = f"event{next(self._events)}"
        self.log.append(("record", event, stream))
        return event

    def wait_event(self, stream, event):
        self.log.append(("wait", stream, event))

    def wait_stream(self, stream, other):
        self.log.append(("wait for", stream, other))

    def keep_alive(self, tensor, stream):
        self.log.append(("keep alive", stream))

    def on_device(self, tensor):
        return True

    def pinned(self, like):
        return torch.empty_like(like)

    def copy(self, dst, src):
        self.log.append(("to host", self.active))
        dst.copy_(src)

    def to_device(self, host):
        self.log.append(("to device", self.active))
        return host.clone()

    def synchronize(self, event):
        self.log.append(("host waits", event))


def test_a_copy_to_host_runs_on_the_side_stream_after_the_work_that_made_it():
    streams = FakeStreams()
    stream = Stream("cpu", "cpu", streams=streams)
    value = _batches(torch.float32)[0]
    stream.append(value)
    assert streams.log == [
        ("wait for", "side", "compute"),  # the value is complete
        ("to host", "side"),
        ("keep alive", "side"),  # its memory outlives the copy
        ("record", "event0", "side"),
    ]
    streams.log.clear()
    assert torch.equal(stream[0], value)
    assert streams.log == [("wait", "compute", "event0"), ("to device", "compute")]


def test_iteration_copies_the_next_batch_on_the_side_stream_while_one_is_used():
    streams = FakeStreams()
    stream = Stream("cpu", "cpu", streams=streams)
    batches = _batches(torch.float32)
    for b in batches:
        stream.append(b)  # ready events 0, 1, 2
    streams.log.clear()
    served = iter(stream)
    first = next(served)
    assert streams.log == [
        ("wait", "side", "event0"), ("to device", "side"), ("record", "event3", "side"),  # batch 0
        ("wait", "side", "event1"), ("to device", "side"), ("record", "event4", "side"),  # batch 1, ahead
        ("wait", "compute", "event3"), ("keep alive", "compute"),  # batch 0 is used
    ]  # fmt: skip
    streams.log.clear()
    rest = list(served)
    assert streams.log == [
        ("wait", "side", "event2"), ("to device", "side"), ("record", "event5", "side"),
        ("wait", "compute", "event4"), ("keep alive", "compute"),
        ("wait", "compute", "event5"), ("keep alive", "compute"),
    ]  # fmt: skip
    assert all(torch.equal(got, b) for got, b in zip([first, *rest], batches))


def test_disk_writes_wait_for_the_copy_and_reads_run_ahead(tmp_path, monkeypatch):
    streams = FakeStreams()
    stream = Stream("disk", "cpu", tmp_path, streams=streams)
    batches = _batches(torch.bfloat16)
    reads = []
    host = Stream._host
    monkeypatch.setattr(Stream, "_host", lambda self, i: reads.append(i) or host(self, i))
    for b in batches:
        stream.append(b)
    stream.flush()
    waits = [entry for entry in streams.log if entry[0] == "host waits"]
    assert waits == [("host waits", f"event{i}") for i in range(len(batches))]  # each write waited its copy
    served = iter(stream)
    first = next(served)
    assert reads[:2] == [0, 1]  # batch 1 was read, and copied ahead, before batch 0 was served
    assert all(torch.equal(got, b) for got, b in zip([first, *served], batches))
    assert reads == [0, 1, 2]
    stream.close()
    assert list(tmp_path.iterdir()) == []
