"""Tiny randomly initialised models of each supported family, with experts and calibration data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5EncoderModel,
    T5Model,
    ViTConfig,
    ViTModel,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import featcal

HIDDEN, HEADS, MLP = 32, 4, 64


@dataclass
class Family:
    """How the tests build, run and read a tiny model of one family (independently of featcal)."""

    name: str
    build: Callable[[int], nn.Module]
    blocks: Callable[[nn.Module], nn.ModuleList]
    backbone: Callable[[nn.Module], nn.Module]
    make_batch: Callable[[torch.Generator, int], dict]
    class_focus: bool = False
    call_kwargs: dict = field(default_factory=dict)
    # the modules of a block that open a sub-layer (reference_impl's sequential="sublayer")
    sublayers: tuple[str, ...] = ()
    # module name -> the axis of the tokens in its 4-D input (per-head norms)
    token_axis: Callable[[str], int] = lambda name: 1


def _vision_batch(gen: torch.Generator, size: int) -> dict:
    return {"pixel_values": torch.randn(size, 3, 32, 32, generator=gen)}


def _text_batch(
    gen: torch.Generator, size: int, length: int = 12, pad_to: int | None = None, shortest: int = 4
) -> dict:
    ids = torch.randint(5, 100, (size, length), generator=gen)
    lengths = torch.randint(shortest, length + 1, (size,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask + (1 - mask)  # token 1 as padding
    if pad_to is not None and pad_to > length:
        extra = pad_to - length
        ids = torch.cat([ids, torch.ones(size, extra, dtype=ids.dtype)], dim=1)
        mask = torch.cat([mask, torch.zeros(size, extra, dtype=mask.dtype)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}


_VISION = dict(
    hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS, image_size=32, patch_size=8
)


def _clip_vision_config(layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(num_hidden_layers=layers, **_VISION)


def _seeded(fn):
    """A builder that seeds, builds, and gives LayerNorm affines and Linear biases random values
    (HF initialises them to 1 and 0, which would make their calibration trivial)."""

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = fn().eval()
        with torch.no_grad():
            for module in model.modules():
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                norm = type(module).__name__.endswith(("RMSNorm", "T5LayerNorm"))
                if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or norm:
                    weight.copy_(1 + 0.2 * torch.randn_like(weight))
                    if bias is not None:
                        bias.copy_(0.2 * torch.randn_like(bias))
                elif isinstance(module, (nn.Linear, Conv1D)) and bias is not None:
                    bias.copy_(0.02 * torch.randn_like(bias))
        return model

    return build


CLIP_VISION = Family(
    "clip-vision",
    _seeded(lambda: CLIPVisionModel(_clip_vision_config(3))),
    blocks=lambda m: m.encoder.layers,
    backbone=lambda m: m,
    make_batch=_vision_batch,
    class_focus=True,
    sublayers=("layer_norm1", "layer_norm2"),
)

CLIP_FULL = Family(
    "clip-model",
    _seeded(
        lambda: CLIPModel(
            CLIPConfig(
                text_config=dict(
                    hidden_size=HIDDEN,
                    intermediate_size=MLP,
                    num_hidden_layers=1,
                    num_attention_heads=HEADS,
                    vocab_size=100,
                ),
                vision_config=_clip_vision_config(2).to_dict(),
                projection_dim=16,
            )
        )
    ),
    blocks=lambda m: m.vision_model.encoder.layers,
    backbone=lambda m: m.vision_model,
    make_batch=_vision_batch,
    class_focus=True,
    sublayers=("layer_norm1", "layer_norm2"),
)

VIT = Family(
    "vit",
    _seeded(lambda: ViTModel(ViTConfig(num_hidden_layers=2, **_VISION))),
    blocks=lambda m: m.layers if hasattr(m, "layers") else m.encoder.layer,
    backbone=lambda m: m,
    make_batch=_vision_batch,
    sublayers=("layernorm_before", "layernorm_after"),
)

_TEXT = dict(
    vocab_size=100,
    hidden_size=HIDDEN,
    intermediate_size=MLP,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    max_position_embeddings=64,
    pad_token_id=1,
)


def _text_family(name: str, model_cls, config_cls) -> Family:
    return Family(
        name,
        _seeded(lambda: model_cls(config_cls(**_TEXT), add_pooling_layer=False)),
        blocks=lambda m: m.encoder.layer,
        backbone=lambda m: m,
        make_batch=_text_batch,
        sublayers=("attention.self.query", "intermediate.dense"),  # post-norm: the norms close them
    )


BERT = _text_family("bert", BertModel, BertConfig)
ROBERTA = _text_family("roberta", RobertaModel, RobertaConfig)

FAMILIES = [CLIP_VISION, CLIP_FULL, VIT, BERT, ROBERTA]

_DECODER = dict(
    vocab_size=100,
    hidden_size=HIDDEN,
    intermediate_size=MLP,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=1,
)


def _decoder_family(name: str, model_cls, config_cls) -> Family:
    return Family(
        name,
        _seeded(lambda: model_cls(config_cls(**_DECODER))),
        blocks=lambda m: m.model.layers,
        backbone=lambda m: m.model,
        make_batch=_text_batch,
        call_kwargs={"use_cache": False},
    )


LLAMA = _decoder_family("llama", LlamaForCausalLM, LlamaConfig)
MISTRAL = _decoder_family("mistral", MistralForCausalLM, MistralConfig)
QWEN2 = _decoder_family("qwen2", Qwen2ForCausalLM, Qwen2Config)
GPT2 = Family(
    "gpt2",
    _seeded(
        lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64)
        )
    ),
    blocks=lambda m: m.transformer.h,
    backbone=lambda m: m.transformer,
    make_batch=_text_batch,
    call_kwargs={"use_cache": False},
)

_T5 = dict(
    vocab_size=100,
    d_model=HIDDEN,
    d_kv=8,
    d_ff=MLP,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=HEADS,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
)


def _t5_batch(gen: torch.Generator, size: int, pad_to: int | None = None) -> dict:
    batch = _text_batch(gen, size, pad_to=pad_to)
    target = _text_batch(gen, size, length=6)
    return {
        **batch,
        "decoder_input_ids": target["input_ids"],
        "decoder_attention_mask": target["attention_mask"],
    }


T5 = Family(
    "t5",
    _seeded(lambda: T5Model(T5Config(**_T5))),
    blocks=lambda m: m.decoder.block,
    backbone=lambda m: m,
    make_batch=_t5_batch,
)
T5_ENCODER = Family(
    "t5-encoder",
    _seeded(lambda: T5EncoderModel(T5Config(**_T5))),
    blocks=lambda m: m.encoder.block,
    backbone=lambda m: m,
    make_batch=_text_batch,
)

LARGE_FAMILIES = [LLAMA, MISTRAL, QWEN2, GPT2, T5, T5_ENCODER]

_HEADS = dict(head_dim=HIDDEN // HEADS)
# Sliding-window layers (a window of 3 < 12 tokens) alternating with full attention.
_LAYER_TYPES = dict(
    num_hidden_layers=3,
    sliding_window=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    query_pre_attn_scalar=HIDDEN // HEADS,
)
_MOE = dict(num_experts_per_tok=2)


def _modern_family(name: str, model_cls, config_cls, *, batch=_text_batch, **extra) -> Family:
    def build():
        config = config_cls(**{**_DECODER, **extra})
        config._experts_implementation = "eager"  # grouped_mm has no float64 (they agree to 1e-7)
        return model_cls(config)

    family = _decoder_family(name, model_cls, config_cls)
    family.build, family.make_batch = _seeded(build), batch
    return family


def _short_padding_batch(gen: torch.Generator, size: int, **kwargs) -> dict:
    """At most 2 padding tokens: within a window of 3 every padding query still sees a real key
    (HF's float64 eager attention turns a fully masked row into NaN, which then spreads)."""
    return _text_batch(gen, size, shortest=10, **kwargs)


QWEN3 = _modern_family("qwen3", Qwen3ForCausalLM, Qwen3Config, **_HEADS)
PHI3 = _modern_family("phi3", Phi3ForCausalLM, Phi3Config, bos_token_id=2, eos_token_id=2)
GEMMA = _modern_family("gemma", GemmaForCausalLM, GemmaConfig, **_HEADS)
GEMMA2 = _modern_family(
    "gemma2", Gemma2ForCausalLM, Gemma2Config, batch=_short_padding_batch, **_HEADS, **_LAYER_TYPES
)
GEMMA3 = _modern_family(
    "gemma3", Gemma3ForCausalLM, Gemma3TextConfig, batch=_short_padding_batch, **_HEADS, **_LAYER_TYPES
)
GEMMA3.token_axis = lambda name: 2 if name.endswith(("q_norm", "k_norm")) else 1
GEMMA2.sublayers = GEMMA3.sublayers = ("input_layernorm", "pre_feedforward_layernorm")
QWEN3.sublayers = GEMMA.sublayers = ("input_layernorm", "post_attention_layernorm")
MIXTRAL = _modern_family("mixtral", MixtralForCausalLM, MixtralConfig, num_local_experts=4, **_MOE)
QWEN2_MOE = _modern_family(
    "qwen2-moe",
    Qwen2MoeForCausalLM,
    Qwen2MoeConfig,
    num_experts=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=MLP,
    **_MOE,
)
QWEN3_MOE = _modern_family(
    "qwen3-moe",
    Qwen3MoeForCausalLM,
    Qwen3MoeConfig,
    num_experts=4,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    **_HEADS,
    **_MOE,
)
OLMOE = _modern_family(
    "olmoe", OlmoeForCausalLM, OlmoeConfig, num_experts=4, bos_token_id=2, eos_token_id=2, **_MOE
)
MOE_FAMILIES = [MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE]
MIXTRAL.sublayers = ("input_layernorm", "post_attention_layernorm")
NEW_FAMILIES = [QWEN3, PHI3, GEMMA, GEMMA2, GEMMA3, *MOE_FAMILIES]


class ToyBlock(nn.Module):
    """Every other module kind: RMSNorm (HF and torch), GPT-2 Conv1D, bias-free LayerNorm and
    Linears, and two Linears (gate, up) reading one input."""

    def __init__(self, d: int = 16, h: int = 40):
        super().__init__()
        self.ln_1 = LlamaRMSNorm(d, eps=1e-6)
        self.c_fc, self.c_proj = Conv1D(h, d), Conv1D(d, h)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d)
        self.ln_3 = nn.RMSNorm(d, eps=1e-5)

    def forward(self, hidden):
        hidden = hidden + self.c_proj(torch.tanh(self.c_fc(self.ln_1(hidden))))
        y = self.ln_2(hidden)
        return self.ln_3(hidden + self.down(F.silu(self.gate(y)) * self.up(y)))


class Stack(nn.Module):
    """An embedding and a list of blocks: the smallest model a registered adapter drives."""

    def __init__(self, blocks: list[nn.Module], width: int):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        hidden = self.embed(x.to(self.embed.weight.dtype))
        for block in self.blocks:
            hidden = block(hidden)
        return BaseModelOutput(last_hidden_state=hidden)


STACK_ADAPTER = featcal.ModelAdapter(name="stack", classes=("Stack",), blocks=lambda m: m.blocks)


@contextmanager
def registered(adapter):
    """`adapter` registered with featcal for the duration."""
    featcal.register_adapter(adapter)
    try:
        yield adapter
    finally:
        featcal.models.adapters._ADAPTERS.remove(adapter)


TOY_KINDS = Family(
    "toy-kinds",
    _seeded(lambda: Stack([ToyBlock(), ToyBlock()], 16)),
    blocks=lambda m: m.blocks,
    backbone=lambda m: m,
    make_batch=lambda gen, size: {"x": torch.randn(size, 6, 3, generator=gen)},
    sublayers=("ln_1", "ln_2", "ln_3"),
)


def word_tokenizer(vocab_size: int = 100):
    """A word-level tokenizer of the words w4 ... w{vocab_size - 1} (ids 4 on; 0-3 are <unk>,
    <pad>, <s>, </s>), built here: nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_checkpoints(root, base, experts: dict, merged, shard: str = "30KB"):
    """Sharded checkpoints of every model under `root`; returns (base dir, expert dirs, merged dir)."""
    base.save_pretrained(root / "base", max_shard_size=shard)
    merged.save_pretrained(root / "merged", max_shard_size=shard)
    for task, expert in experts.items():
        expert.save_pretrained(root / task, max_shard_size=shard)
    return root / "base", {t: root / t for t in experts}, root / "merged"


def same_checkpoints(a, b) -> bool:
    """Whether two safetensors checkpoint directories hold the same tensors, bit for bit."""
    from featcal.io.lazy_checkpoint import LazyCheckpoint

    left, right = LazyCheckpoint(a), LazyCheckpoint(b)
    return left.keys() == right.keys() and all(
        torch.equal(left.read([k])[k], right.read([k])[k]) for k in left.keys()
    )


def make_experts(base: nn.Module, tasks: int, rel: float = 0.05, seed: int = 1) -> dict:
    """Experts = base + Gaussian deltas of `rel` times each floating tensor's std."""
    gen = torch.Generator().manual_seed(seed)
    experts = {}
    for t in range(tasks):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                if p.numel() > 1:
                    p.add_(rel * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        experts[f"task{t}"] = expert
    return experts


def make_data(family: Family, tasks, batches: int = 2, size: int = 4, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {t: [family.make_batch(gen, size) for _ in range(batches)] for t in tasks}


def setup(family: Family, tasks: int = 3, dtype=torch.float64, scaling: float = 0.3, rel: float = 0.05):
    """(base, experts, merged, data) for a family, in `dtype`; experts with task vectors of `rel`
    times each tensor's std, merged by Task Arithmetic."""
    base = family.build(0).to(dtype)
    config = getattr(base, "config", None)
    if dtype != torch.float64 and config is not None:  # MoE: transformers' default experts (float64: eager)
        config._experts_implementation = "grouped_mm"
    experts = make_experts(base, tasks, rel)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            delta = sum(dict(e.named_parameters())[name] - p for e in experts.values())
            p.add_(scaling * delta)
    return base, experts, merged, make_data(family, list(experts))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def features(family: Family, model: nn.Module, batches) -> torch.Tensor:
    """Final hidden states of the backbone on `batches` (concatenated over batches)."""
    with torch.no_grad():
        return torch.cat(
            [family.backbone(model)(**b, **family.call_kwargs).last_hidden_state for b in batches]
        )
