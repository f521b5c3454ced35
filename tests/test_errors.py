"""Bad input gets a clear error naming the task, block, module or shape at fault."""

import copy

import pytest
import torch
from tiny_models import CLIP_VISION, STACK_ADAPTER, T5, Stack, make_experts, registered, setup
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

import featcal
from featcal import FeatCalConfig, FeatCalError, NonFiniteError, UnsupportedModelError, calibrate

CFG = FeatCalConfig(progress=False)


@pytest.fixture(scope="module")
def clip32():
    base, experts, merged, data = setup(CLIP_VISION, tasks=2, dtype=torch.float32)
    return base, experts, merged, data


def _run(clip32, **changes):
    base, experts, merged, data = clip32
    kwargs = dict(base=base, experts=experts, data=data, config=CFG) | changes
    return calibrate(copy.deepcopy(merged), **kwargs)


def test_expert_with_other_shapes_names_module_and_shapes(clip32):
    config = CLIP_VISION.build(0).config
    other = CLIPVisionModel(CLIPVisionConfig(**{**config.to_dict(), "intermediate_size": 48}))
    experts = dict(clip32[1], task1=other)
    with pytest.raises(
        FeatCalError,
        match=r"block 0, module 'mlp.fc1': weight has shape \(48, 32\) in the expert 'task1' but \(64, 32\)",
    ):
        _run(clip32, experts=experts)


def test_expert_with_other_depth(clip32):
    config = CLIP_VISION.build(0).config
    other = CLIPVisionModel(CLIPVisionConfig(**{**config.to_dict(), "num_hidden_layers": 2}))
    with pytest.raises(FeatCalError, match="the expert 'task0' has 2 blocks but the merged model has 3"):
        _run(clip32, experts=dict(clip32[1], task0=other))


def test_base_of_other_architecture(clip32):
    with pytest.raises(UnsupportedModelError, match="base model, a Sequential"):
        _run(clip32, base=nn.Sequential(nn.Linear(2, 2)))


def test_task_without_data(clip32):
    data = dict(clip32[3], task1=[])
    with pytest.raises(FeatCalError, match="task 'task1' has no calibration data"):
        _run(clip32, data=data)


def test_tasks_of_experts_and_data_must_agree(clip32):
    data = clip32[3]
    with pytest.raises(FeatCalError, match=r"tasks \['task1'\] have an expert but no calibration data"):
        _run(clip32, data={"task0": data["task0"]})
    with pytest.raises(FeatCalError, match=r"tasks \['extra'\] have calibration data but no expert"):
        _run(clip32, data=dict(data, extra=data["task0"]))
    with pytest.raises(FeatCalError, match="no experts given"):
        _run(clip32, experts={}, data={})


def test_nan_in_student_activations_names_task_block_module(clip32):
    data = copy.deepcopy(clip32[3])
    data["task1"][1]["pixel_values"][2, 0, 5, 5] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"task 'task1', block 0, module\(s\) \['layer_norm1'\] \(student"
    ):
        _run(clip32, data=data)


def test_inf_in_expert_activations_names_task_block_module(clip32):
    experts = {t: copy.deepcopy(e) for t, e in clip32[1].items()}
    with torch.no_grad():
        experts["task0"].encoder.layers[1].mlp.fc1.weight[3, 4] = float("inf")
    with pytest.raises(
        NonFiniteError, match=r"task 'task0', block 1, module\(s\) \['mlp.fc2'\] \(expert side\)"
    ):
        _run(clip32, experts=experts)


def test_unknown_architecture_lists_families_and_how_to_add_one():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError) as err:
        calibrate(Toy(), base=Toy(), experts={"a": Toy()}, data={"a": [torch.randn(2, 3, 4)]}, config=CFG)
    message = str(err.value)
    for needed in ("merged model, a Toy", "clip-vision", "vit", "bert", "register_adapter", "blocks="):
        assert needed in message


def test_batches_must_be_tensors_or_dicts(clip32):
    with pytest.raises(FeatCalError, match="task 'task0': batch 0 is a list"):
        _run(clip32, data={"task0": [[1, 2]], "task1": clip32[3]["task1"]})


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, h):
        if h.shape[0] < 4:  # a data-dependent path: small batches skip the MLP
            return self.norm(h)
        return h + self.down(torch.tanh(self.up(self.norm(h))))


@pytest.fixture
def stack_models():
    with registered(STACK_ADAPTER):
        torch.manual_seed(0)
        base = Stack([_Block(), _Block()], 8)
        experts = make_experts(base, 2, rel=0.2)
        yield base, experts, featcal.task_arithmetic(base, experts)


def test_registered_adapter_calibrates_a_new_family(stack_models):
    base, experts, merged = stack_models
    data = {t: [torch.randn(4, 6, 3) for _ in range(3)] for t in experts}
    before = copy.deepcopy(merged)
    _, report = calibrate(merged, base=base, experts=experts, data=data, config=CFG)
    assert not torch.equal(merged.blocks[1].down.weight, before.blocks[1].down.weight)
    assert report.blocks[-1].drift_calibrated < report.blocks[-1].drift_merged


def test_module_skipped_in_a_later_batch_is_named(stack_models):
    base, experts, merged = stack_models
    data = {t: [torch.randn(4, 6, 3), torch.randn(2, 6, 3)] for t in experts}
    with pytest.raises(
        FeatCalError, match=r"task 'task0', block 0: modules \[\['up'\], \['down'\]\] were not called"
    ):
        calibrate(merged, base=base, experts=experts, data=data, config=CFG)


@pytest.mark.parametrize(("stack", "stage"), [("encoder", "t5"), ("decoder", "t5-decoder")])
def test_messages_tell_t5_encoder_and_decoder_blocks_apart(stack, stage):
    base, experts, merged, data = setup(T5, tasks=2, dtype=torch.float32)
    with torch.no_grad():
        getattr(experts["task1"], stack).block[1].layer[-1].DenseReluDense.wi_0.weight[0, 0] = float("inf")
    with pytest.raises(
        NonFiniteError, match=rf"task 'task1', {stage} block 1, module\(s\) \['layer.*\(expert side\)"
    ):
        calibrate(merged, base=base, experts=experts, data=data, config=CFG)
