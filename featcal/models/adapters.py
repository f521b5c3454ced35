"""Model-family adapters: where a model's blocks are, how to run one, and which tokens count.

An adapter is small. To support a new family, register one:

    featcal.register_adapter(featcal.ModelAdapter(
        name="my-encoder",
        classes=("MyEncoderModel",),              # class names matched along the model's MRO
        blocks=lambda backbone: backbone.layers,  # the transformer blocks, in forward order
    ))

Optional fields: `backbone` (the module to call with a batch; by default the HF base model of a
task-head wrapper), `inputs` (batch keys passed to it), `token_mask` (padding mask of a batch,
weight 0 for padding), `token_focus` (extra token weights per block and module), `run_block`,
`module_kind` (which modules are calibrated, and as what; norms are found by their formula),
`check_model` (refusals), `post_norm` (norms that close a sub-layer), `layer_types` (blocks
replayed with the arguments of their type), `token_axis` (where the tokens are in inputs of
more than three dimensions) and `encdec` for T5-style encoder-decoders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FeatCalError, UnsupportedModelError
from .modules import ModuleKind, module_kind

Batch = Tensor | Mapping[str, Tensor]


def first_output(output: object) -> Tensor:
    """The hidden states returned by a block: a tensor, or the first item of a tuple / ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return next(iter(output.values()))
    return output[0]


def call_block(block: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """Run one block on captured inputs and return its output hidden states."""
    return first_output(block(*args, **kwargs))


def first_attribute(obj: object, *paths: str) -> Any:
    """The first of the dotted attribute `paths` that `obj` has (model layouts vary by version)."""
    for path in paths:
        value = obj
        for part in path.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        else:
            return value
    raise AttributeError(f"{type(obj).__name__} has none of the attributes {list(paths)}")


def hf_backbone(model: nn.Module) -> nn.Module:
    """The HF base model inside a task-head wrapper (`BertForSequenceClassification.bert`), else the model."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


def attention_mask_of(batch: Batch) -> Tensor | None:
    """The (batch, tokens) `attention_mask` of a batch, if it has one: padding tokens weigh 0."""
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    return None


def no_token_mask(batch: Batch) -> None:
    return None


def input_ids_length(batch: Batch) -> int | None:
    """Tokens per example of a batch of `input_ids` (batch, tokens); None for other inputs."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return ids.shape[1] if isinstance(ids, Tensor) and ids.dim() == 2 else None


def no_focus(block_index: int, num_blocks: int, module_name: str) -> float | None:
    return None


def pre_norms_only(module_name: str) -> bool:
    return False


def same_hidden(backbone: nn.Module, hidden: Tensor) -> Tensor:
    return hidden


def accept_any(model: nn.Module, role: str) -> None:
    return None


def config_layer_types(backbone: nn.Module) -> Sequence[str] | None:
    """The type of each block, from the backbone's `config.layer_types` (sliding-window or full
    attention; the backbone's, since a wrapper's config may hold the text model's as a part)."""
    return getattr(getattr(backbone, "config", None), "layer_types", None)


def tokens_on_axis_1(module_name: str) -> int:
    return 1


def attention_head_norms(module_name: str) -> bool:
    """Query and key norms (Qwen3, Gemma 3, OLMoE): inside the attention sub-layer."""
    return module_name.endswith(("q_norm", "k_norm"))


@dataclass(frozen=True)
class EncoderDecoder:
    """What a T5-style model adds to its adapter (the defaults: a plain stack of blocks).

    later_arguments: (first block, args, kwargs) -> (args, kwargs) of the blocks after the first,
        when the backbone passes them something the first block computes (T5's position bias).
    next_stage: the adapter of the stage calibrated after this one's blocks (T5: the decoder).
    stage_output: (backbone, last block's output) -> what the stage hands to the next (final norm).
    stage_inputs: for a later stage, (task batch, previous stage's output) -> its backbone inputs.
    batch_keys: further batch keys the model reads (e.g. in a later stage), so not warned about.
    memory_inputs: module name -> whether it reads the encoder output rather than the hidden
        states (cross-attention keys and values), with `memory_mask(batch)` as token weights.
    """

    later_arguments: Callable[[nn.Module, tuple, dict], tuple[tuple, dict]] | None = None
    next_stage: ModelAdapter | None = None
    stage_output: Callable[[nn.Module, Tensor], Tensor] = same_hidden
    stage_inputs: Callable[[Batch, Tensor], dict] | None = None
    batch_keys: tuple[str, ...] = ()
    memory_inputs: Callable[[str], bool] | None = None
    memory_mask: Callable[[Batch], Tensor | None] = no_token_mask


@dataclass(frozen=True)
class ModelAdapter:
    """How featcal drives one model family.

    name: the family, as shown in messages.
    classes: model class names this adapter accepts, matched along the model's class hierarchy.
    blocks: backbone -> its transformer blocks in forward order (an nn.ModuleList).
    backbone: model -> the module that is called with a batch and runs the blocks.
    inputs: batch keys passed to the backbone (None: all of them).
    token_mask: batch -> (batch, tokens) weights, 0 for padding (None: every token weighs 1).
    sequence_length: batch -> tokens per example, or None when a probe of the model must tell
        (images); sizes the memory plan before any block runs.
    token_focus: (block index, number of blocks, module name) -> weight of tokens 1.. relative to
        token 0 for that module's statistics, or None for uniform weights.
    run_block: (block, args, kwargs) -> output hidden states of the block.
    call_kwargs: fixed keyword arguments of every backbone call (e.g. use_cache=False).
    module_kind: module -> its kind (featcal.models.modules: LINEAR, a norm kind, UNKNOWN_NORM or
        None); the default recognises Linear, Conv1D, LayerNorm and norms by their formula.
    hidden_argument: the keyword of the hidden states when a block gets them by keyword.
    check_model: (model, role) -> None, or an error for a layout featcal cannot calibrate.
    layer_types: backbone -> the type of each block (default `config.layer_types`); blocks of each
        type are replayed with the arguments the model passes to its first block of that type.
    token_axis: module name -> the axis of its input that indexes tokens, for inputs of more than
        three dimensions (heads: Qwen3's q_norm reads (batch, tokens, heads, head_dim), axis 1;
        Gemma 3's (batch, heads, tokens, head_dim), axis 2); token weights broadcast over the rest.
    post_norm: norm module name -> whether it normalises its sub-layer's output and so closes
        the sub-layer rather than opening the next one (post-norm blocks: BERT; Gemma's
        post-attention and post-feedforward norms); splits blocks for `FeatCalConfig(sequential=...)`.
    inner_norm: norm module name -> whether it neither opens nor closes a sub-layer there.
    encdec: the T5-style fields (stages, computed block arguments, cross-attention memory).
    """

    name: str
    classes: tuple[str, ...]
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    backbone: Callable[[nn.Module], nn.Module] = hf_backbone
    inputs: tuple[str, ...] | None = None
    token_mask: Callable[[Batch], Tensor | None] = attention_mask_of
    sequence_length: Callable[[Batch], int | None] = input_ids_length
    token_focus: Callable[[int, int, str], float | None] = no_focus
    run_block: Callable[[nn.Module, tuple, dict], Tensor] = call_block
    call_kwargs: Mapping[str, object] = field(default_factory=dict)
    module_kind: ModuleKind = module_kind
    hidden_argument: str = "hidden_states"
    check_model: Callable[[nn.Module, str], None] = accept_any
    layer_types: Callable[[nn.Module], Sequence[str] | None] = config_layer_types
    token_axis: Callable[[str], int] = tokens_on_axis_1
    post_norm: Callable[[str], bool] = pre_norms_only
    inner_norm: Callable[[str], bool] = attention_head_norms
    encdec: EncoderDecoder = EncoderDecoder()

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__name__ in self.classes for cls in type(model).__mro__)


def _clip_vision_backbone(model: nn.Module) -> nn.Module:
    # transformers 4.x: CLIPModel/CLIPVisionModel.vision_model is a CLIPVisionTransformer;
    # 5.x: CLIPVisionModel holds the encoder itself and CLIPModel.vision_model is a CLIPVisionModel.
    return getattr(model, "vision_model", model)


def clip_class_token_focus(block_index: int, num_blocks: int, module_name: str) -> float | None:
    """The reference's focus on the class token in the last block, except for keys and values."""
    last = block_index == num_blocks - 1
    return 0.01 if last and not module_name.endswith(("k_proj", "v_proj")) else None


CLIP_VISION = ModelAdapter(
    name="clip-vision",
    classes=("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPVisionTransformer"),
    blocks=lambda backbone: backbone.encoder.layers,
    backbone=_clip_vision_backbone,
    inputs=("pixel_values",),
    token_mask=no_token_mask,
    token_focus=clip_class_token_focus,
)

VIT = ModelAdapter(
    name="vit",
    classes=("ViTPreTrainedModel",),
    blocks=lambda backbone: first_attribute(backbone, "layers", "encoder.layer"),
    inputs=("pixel_values", "interpolate_pos_encoding"),
    token_mask=no_token_mask,
)

BERT = ModelAdapter(
    name="bert",
    classes=("BertPreTrainedModel", "RobertaPreTrainedModel"),
    blocks=lambda backbone: backbone.encoder.layer,
    inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"),
    post_norm=lambda name: name.endswith("LayerNorm"),  # attention.output.LayerNorm, output.LayerNorm
)

DECODER_LM = ModelAdapter(
    name="llama",
    classes=("LlamaPreTrainedModel", "MistralPreTrainedModel", "Qwen2PreTrainedModel"),
    blocks=lambda backbone: backbone.layers,
    inputs=("input_ids", "attention_mask", "position_ids", "inputs_embeds"),
    call_kwargs={"use_cache": False},
)

# Qwen3's q_norm and k_norm normalise each head of (batch, tokens, heads, head_dim).
QWEN3 = replace(DECODER_LM, name="qwen3", classes=("Qwen3PreTrainedModel",))

# Fused qkv_proj and gate_up_proj are Linears like any other.
PHI3 = replace(DECODER_LM, name="phi3", classes=("Phi3PreTrainedModel",))


def _gemma_token_axis(module_name: str) -> int:
    # Gemma 3 normalises queries and keys after the heads move before the tokens.
    return 2 if attention_head_norms(module_name) else 1


# Norms z * (1 + w), found by their formula; otherwise a Llama.
GEMMA = replace(DECODER_LM, name="gemma", classes=("GemmaPreTrainedModel",))

# Gemma 2 and 3: four norms, the post-attention and post-feedforward ones reading their
# sub-layer's output; sliding-window and full-attention layers (and Gemma 3's two rotary
# embeddings) per layer type.
GEMMA2 = replace(
    DECODER_LM,
    name="gemma2",
    classes=("Gemma2PreTrainedModel", "Gemma3ForCausalLM", "Gemma3TextModel"),
    post_norm=lambda name: name.endswith(("post_attention_layernorm", "post_feedforward_layernorm")),
    token_axis=_gemma_token_axis,
)

# Fused routed experts (modules.ROUTED_EXPERTS), the router, Qwen2-MoE's shared expert.
MOE = replace(
    DECODER_LM,
    name="moe",
    classes=(
        "MixtralPreTrainedModel",
        "Qwen2MoePreTrainedModel",
        "Qwen3MoePreTrainedModel",
        "OlmoePreTrainedModel",
    ),
)

GPT2 = ModelAdapter(
    name="gpt2",
    classes=("GPT2PreTrainedModel",),
    blocks=lambda backbone: backbone.h,
    inputs=("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds"),
    call_kwargs={"use_cache": False},
)


def _t5_later_arguments(first_block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """T5Stack hands every block the self- and cross-attention position biases that its first
    block returns (positions 2 and 5 of the block's arguments)."""
    output = first_block(*args, **kwargs)
    args = list(args)
    args[2] = output[1]
    if len(args) > 5 and len(output) > 2:
        args[5] = output[2]
    return tuple(args), kwargs


def _t5_encoder_output(encoder: nn.Module, hidden: Tensor) -> Tensor:
    return encoder.dropout(encoder.final_layer_norm(hidden))


def _t5_decoder_inputs(batch: Batch, encoder_output: Tensor) -> dict:
    """The decoder's inputs: `decoder_input_ids` (with `decoder_attention_mask`), or `labels`
    shifted right behind the start token 0 (-100 marks ignored positions, weight 0), or the start
    token alone; cross-attention reads the encoder output under the batch's attention mask."""
    if not isinstance(batch, Mapping):
        raise FeatCalError("T5 batches must be dicts with input_ids (and decoder_input_ids or labels)")
    size = encoder_output.shape[0]
    ids, mask = batch.get("decoder_input_ids"), batch.get("decoder_attention_mask")
    if ids is None and batch.get("labels") is not None:
        labels = batch["labels"]
        start = torch.zeros_like(labels[:, :1])
        ids = torch.cat([start, labels[:, :-1].clamp_min(0)], dim=1)
        mask = torch.cat([torch.ones_like(start), (labels[:, :-1] != -100).long()], dim=1)
    if ids is None:
        ids = torch.zeros(size, 1, dtype=torch.long, device=encoder_output.device)
    inputs = {"input_ids": ids, "encoder_hidden_states": encoder_output}
    if mask is not None:
        inputs["attention_mask"] = mask
    if batch.get("attention_mask") is not None:
        inputs["encoder_attention_mask"] = batch["attention_mask"]
    return inputs


_T5_STACK = dict(blocks=lambda backbone: backbone.block, call_kwargs={"use_cache": False})

T5_DECODER = ModelAdapter(
    name="t5-decoder",
    classes=(),
    backbone=lambda model: model.decoder,
    inputs=("input_ids", "attention_mask", "encoder_hidden_states", "encoder_attention_mask"),
    encdec=EncoderDecoder(
        later_arguments=_t5_later_arguments,
        stage_inputs=_t5_decoder_inputs,
        memory_inputs=lambda name: name.endswith(("EncDecAttention.k", "EncDecAttention.v")),
        memory_mask=lambda batch: batch.get("encoder_attention_mask"),
    ),
    **_T5_STACK,
)

T5 = ModelAdapter(
    name="t5",
    classes=("T5ForConditionalGeneration", "T5Model"),
    backbone=lambda model: model.encoder,
    inputs=("input_ids", "attention_mask", "inputs_embeds"),
    encdec=EncoderDecoder(
        later_arguments=_t5_later_arguments,
        next_stage=T5_DECODER,
        stage_output=_t5_encoder_output,
        batch_keys=("decoder_input_ids", "decoder_attention_mask", "labels"),
    ),
    **_T5_STACK,
)

T5_ENCODER = ModelAdapter(
    name="t5-encoder",
    classes=("T5EncoderModel",),
    backbone=lambda model: model.encoder,
    inputs=("input_ids", "attention_mask", "inputs_embeds"),
    encdec=EncoderDecoder(later_arguments=_t5_later_arguments),
    **_T5_STACK,
)

_DESCRIPTIONS = {
    "clip-vision": "CLIPVisionModel, CLIPVisionModelWithProjection, the vision tower of CLIPModel",
    "vit": "ViTModel and its task heads (ViTForImageClassification, ...)",
    "bert": "BertModel, RobertaModel and their task heads (...ForSequenceClassification, ...)",
    "llama": "Llama, Mistral and Qwen2 decoder-only models (...Model, ...ForCausalLM, ...)",
    "qwen3": "Qwen3 (Qwen3Model, Qwen3ForCausalLM, ...)",
    "phi3": "Phi-3 (Phi3Model, Phi3ForCausalLM, ...)",
    "gemma": "Gemma (GemmaModel, GemmaForCausalLM)",
    "gemma2": "Gemma 2 and Gemma 3 text models (Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextModel)",
    "moe": "Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE mixture-of-experts decoders",
    "gpt2": "GPT2Model, GPT2LMHeadModel and other GPT-2 heads",
    "t5": "T5ForConditionalGeneration, T5Model (FLAN-T5): encoder blocks, then decoder blocks",
    "t5-encoder": "T5EncoderModel",
}

_ADAPTERS: list[ModelAdapter] = [
    CLIP_VISION,
    VIT,
    BERT,
    DECODER_LM,
    QWEN3,
    PHI3,
    GEMMA,
    GEMMA2,
    MOE,
    GPT2,
    T5,
    T5_ENCODER,
]


def register_adapter(adapter: ModelAdapter) -> None:
    """Add an adapter; it takes precedence over the built-in ones."""
    _ADAPTERS.insert(0, adapter)


def find_adapter(model: nn.Module, role: str = "model") -> ModelAdapter:
    """The adapter for `model`, or an error that lists the supported families and how to add one."""
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = "\n".join(
        f"  - {a.name}: {_DESCRIPTIONS.get(a.name, ', '.join(a.classes))}" for a in _ADAPTERS
    )
    raise UnsupportedModelError(
        f"featcal does not know how to calibrate the {role}, a {type(model).__name__}.\n"
        f"Supported families:\n{families}\n"
        "To add one, register a small adapter that says where the blocks are, how to run one "
        "and which tokens count, e.g.\n"
        "    featcal.register_adapter(featcal.ModelAdapter(name='mine', classes=('MyModel',),\n"
        "        blocks=lambda backbone: backbone.encoder.layers))\n"
        "See featcal/models/adapters.py for the optional fields (backbone, inputs, token_mask, "
        "token_focus, run_block, module_kind, hidden_argument, check_model, encdec, ...)."
    )
