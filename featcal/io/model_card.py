"""The calibrated output's model card: the merged model's README.md (mergekit writes one) with a
section of featcal's appended, saying what was calibrated, with which settings and data, and the
feature drift per block before and after."""

from __future__ import annotations

from pathlib import Path

from .atomic_file import atomic_file

CARD_FILE = "README.md"
SECTION_TITLE = "## FeatCal calibration"
_SETTINGS = (
    "lambda_ratio",
    "anchor_blend_rho",
    "teacher_interp_alpha",
    "covariance_eps",
    "calibrate_bias",
    "calibrate_layernorm",
    "sequential",
    "min_expert_tokens",
)


def append_featcal_section(directory: Path, report, source: Path | None) -> None:
    """Write `directory`/README.md: `source`/README.md as it is (when there is one), then featcal's
    section from a CalibrationReport. Written afresh each time, so a resumed run's card has one."""
    card = source / CARD_FILE if source is not None else None
    text = card.read_bytes() if card is not None and card.is_file() else b""
    if text:
        text += b"\n" if text.endswith(b"\n") else b"\n\n"
    with atomic_file(directory / CARD_FILE) as tmp:
        tmp.write_bytes(text + featcal_section(report).encode())


def featcal_section(report) -> str:
    """The section as Markdown."""
    inputs = report.inputs
    lines = [SECTION_TITLE, ""]
    if inputs is not None:
        lines += [
            f"This model is `{inputs.merged}` calibrated with FeatCal (arXiv 2605.13030) by featcal "
            f"{inputs.featcal_version} (torch {inputs.torch_version}): each block's weights re-solved, in "
            "forward order, toward the experts' features on the calibration data below.",
            "",
            f"- base model: `{inputs.base}`",
            *(f"- expert `{task}`: `{source}`" for task, source in inputs.experts.items()),
        ]
    settings = ", ".join(f"{name}={report.config[name]}" for name in _SETTINGS if name in report.config)
    lines += [
        f"- settings: {settings}",
        "",
        "| task | examples | tokens | padding tokens | data |",
        "|---|---|---|---|---|",
    ]
    for task, counts in report.tasks.items():
        data = inputs.data.get(task) if inputs is not None else None
        examples = data.examples if data is not None else "-"
        source = f"`{data.source}`" if data is not None else "-"
        lines.append(
            f"| {task} | {examples} | {counts['tokens']} | {counts.get('padding_tokens', 0)} | {source} |"
        )
    lines += [
        "",
        "Feature drift `||S - E|| / ||E||` of each block's output (S: this model, E: the task's expert), "
        "mean over tasks:",
        "",
        "| block | drift merged | drift calibrated |",
        "|---|---|---|",
    ]
    for block in report.blocks:
        name = f"{block.stage} {block.index}" if block.stage else str(block.index)
        lines.append(f"| {name} | {_fmt(block.drift_merged)} | {_fmt(block.drift_calibrated)} |")
    if report.warnings:
        lines += ["", *(f"- warning: {warning}" for warning in report.warnings)]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
