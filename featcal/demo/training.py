"""The demo's models: a small CLIP-style vision encoder, pretrained on upright digits, and one
fully fine-tuned expert per task, each with a linear head of its own on the pooled class token."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import trange
from transformers import CLIPVisionConfig, CLIPVisionModel

from .benchmark import IMAGE_SIZE, TASKS, Split, Task, pixel_values, task_inputs, translate

# Bump when training changes in a way the recipe's fields do not show: old cache entries then miss.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Which tasks, which encoder, and how it is pretrained and fine-tuned. Everything the trained
    models depend on is here, so a hash of it keys the cache."""

    tasks: tuple[str, ...] = tuple(TASKS)
    hidden_size: int = 64
    layers: int = 6
    attention_heads: int = 4
    patch_size: int = 4
    mlp_ratio: int = 4
    pretrain_epochs: int = 4
    finetune_epochs: int = 10
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.01
    test_size: int = 500
    seed: int = 0

    def key(self) -> str:
        """A short hash of the recipe (and RECIPE_VERSION)."""
        text = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# A smaller model and shorter training, for smoke tests: about ten seconds from a cold cache.
QUICK_RECIPE = Recipe(
    tasks=("digits", "rotated", "mirrored", "inverted", "parity", "range"),
    hidden_size=32,
    layers=3,
    pretrain_epochs=2,
    finetune_epochs=4,
    test_size=300,
)


def build_encoder(recipe: Recipe, seed: int) -> CLIPVisionModel:
    """A randomly initialised CLIP vision encoder for 8x8 grey images (seeded, global RNG untouched)."""
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=recipe.patch_size,
        num_channels=1,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.mlp_ratio * recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.attention_heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModel(config).eval()


def build_head(recipe: Recipe, classes: int, seed: int) -> nn.Linear:
    """A linear classifier over the encoder's pooled class token (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(recipe.hidden_size, classes).eval()


def train(
    encoder: CLIPVisionModel,
    head: nn.Linear,
    inputs: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    recipe: Recipe,
    seed: int,
    desc: str,
    progress: bool,
) -> None:
    """Train encoder and head together on cross-entropy: AdamW with a one-cycle learning rate,
    minibatches in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    steps = epochs * math.ceil(len(inputs) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    encoder.train()
    head.train()
    for _ in trange(epochs, desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            logits = head(encoder(pixel_values=inputs[batch]).pooler_output)
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    encoder.eval()
    head.eval()


def pretraining_set(split: Split) -> tuple[Tensor, Tensor]:
    """Upright training digits and their copies moved one pixel up, down, left and right."""
    moves = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    images = torch.cat([translate(split.train_images, down, right) for down, right in moves])
    return pixel_values(images), split.train_digits.repeat(len(moves))


def pretrain(recipe: Recipe, split: Split, progress: bool) -> CLIPVisionModel:
    """The base model: the encoder trained to tell digits apart; its head is dropped."""
    base = build_encoder(recipe, recipe.seed)
    inputs, labels = pretraining_set(split)
    head = build_head(recipe, 10, recipe.seed)
    train(
        base,
        head,
        inputs,
        labels,
        epochs=recipe.pretrain_epochs,
        lr=recipe.pretrain_lr,
        recipe=recipe,
        seed=recipe.seed,
        desc="demo: pretraining the base",
        progress=progress,
    )
    return base


def finetune(
    base: CLIPVisionModel, task: Task, index: int, recipe: Recipe, split: Split, progress: bool
) -> tuple[CLIPVisionModel, nn.Linear]:
    """Expert `index` for `task`: every weight of a copy of the base, and a new head, trained on the task."""
    expert = build_encoder(recipe, recipe.seed)
    expert.load_state_dict(base.state_dict())
    seed = recipe.seed + 1000 * (index + 1)
    head = build_head(recipe, task.classes, seed)
    inputs, labels = task_inputs(task, split.train_images, split.train_digits)
    train(
        expert,
        head,
        inputs,
        labels,
        epochs=recipe.finetune_epochs,
        lr=recipe.finetune_lr,
        recipe=recipe,
        seed=seed,
        desc=f"demo: fine-tuning expert {task.name!r}",
        progress=progress,
    )
    return expert, head


@torch.no_grad()
def accuracy(encoder: CLIPVisionModel, head: nn.Linear, inputs: Tensor, labels: Tensor) -> float:
    """Fraction of `inputs` whose arg-max class is the label."""
    correct = 0
    for start in range(0, len(inputs), 512):
        logits = head(encoder(pixel_values=inputs[start : start + 512]).pooler_output)
        correct += int((logits.argmax(-1) == labels[start : start + 512]).sum())
    return correct / len(inputs)
