"""The memory plan: sizes, where the streams go under budgets, and refusals that say what fits."""

import pytest
import torch
from torch import nn

from featcal.errors import FeatCalError
from featcal.memory_plan import MemoryPlan, choose_placement, estimate, human, parse_bytes

MiB = 2**20


@pytest.mark.parametrize(
    "text, value",
    [
        ("12GiB", 12 * 2**30),
        ("1.5 GB", 1_500_000_000),
        ("512MiB", 512 * MiB),
        ("100", 100),
        (7, 7),
        (None, None),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["twelve", "12 parsecs", "GiB"])
def test_parse_bytes_refuses_what_it_cannot_read(text):
    with pytest.raises(FeatCalError, match="cannot read memory size"):
        parse_bytes(text)


def test_human_sizes():
    assert (human(300), human(3 * MiB // 2), human(5 * 2**30)) == ("300 B", "1.5 MiB", "5.00 GiB")


def _plan(device="cuda:0"):
    return MemoryPlan(
        device=device,
        weights=100 * MiB,
        statistics=50 * MiB,
        activations=30 * MiB,
        streams=1000 * MiB,
        batch=10 * MiB,
    )


@pytest.mark.parametrize(
    "gpu, cpu, placement",
    [
        (None, None, "device"),
        (2000 * MiB, None, "device"),
        (500 * MiB, None, "cpu"),
        (500 * MiB, 900 * MiB, "disk"),
    ],
)
def test_auto_takes_the_first_placement_that_fits(gpu, cpu, placement):
    plan = choose_placement(_plan(), "auto", gpu, cpu)
    assert plan.placement == placement
    assert gpu is None or plan.on_device() <= gpu
    assert cpu is None or plan.on_cpu() <= cpu


def test_on_the_cpu_one_budget_holds_everything():
    assert choose_placement(_plan("cpu"), "auto", None, 2000 * MiB).placement == "device"
    plan = choose_placement(_plan("cpu"), "auto", None, 500 * MiB)
    assert plan.placement == "disk" and plan.on_device() == 200 * MiB and plan.on_disk() == 1000 * MiB


def test_a_budget_below_the_least_is_refused_with_what_would_fit():
    with pytest.raises(FeatCalError, match=r"with its streams on disk it needs 200\.0 MiB of GPU memory"):
        choose_placement(_plan(), "auto", 150 * MiB, None)


def test_a_requested_placement_that_does_not_fit_is_refused():
    with pytest.raises(FeatCalError, match=r"streams: device.*on disk they would fit"):
        choose_placement(_plan(), "device", 500 * MiB, None)


def test_estimate_counts_streams_statistics_and_weights():
    block = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8))
    plan = estimate(
        [block], 1000, torch.float32, torch.float32, [(2, 5, 8), (3, 5, 8)], 40, 2, torch.device("cpu")
    )
    stream = (2 * 5 + 3 * 5) * 8 * 4
    assert plan.streams == 2 * stream + stream // 2 + 40
    assert plan.batch == 2 * 3 * 5 * 8 * 4
    assert plan.weights == 3000
    # per linear: the task's and the summed Gram, the task's cross moment or right-hand side, the
    # summed right-hand side; plus one d x d solve
    assert plan.statistics == 4 * (2 * 64 + 8 * 32 + 8 * 32 + 2 * 32 * 32 + 32 * 32 + 32 * 8 + 32 * 32)
