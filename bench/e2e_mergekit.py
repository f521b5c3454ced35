"""mergekit, then featcal, as a user runs them: the commands end to end on a small random Llama.

A base (float32 Llama, hidden 128, 4 blocks, a word-level tokenizer of 1,000 words) and two
experts, `math` and `code` (the base plus Gaussian task vectors of 20% of each tensor's std), are
saved as checkpoints. Then, each as its own command:
1. `mergekit-yaml` merges them by `ties` (density 0.3, weights 0.5 and 0.7, lambda 1);
2. `featcal merge --method ties --trim per-tensor` makes the same merge (the largest difference
   from mergekit's is reported);
3. `featcal data` makes each task's calibration file from a json-lines file of 256 texts (the
   tasks draw their words from different halves of the vocabulary) with the base's tokenizer;
4. `featcal calibrate --merged <mergekit output> --data ...` reads base and experts from
   mergekit_config.yml.
Printed: each command's seconds, featcal's drift table, and the logits drift toward each
expert, mean_t ||L - L_t|| / ||L_t|| over 64 held-out texts per task, merged and calibrated.

    python bench/e2e_mergekit.py --markdown bench/results/cpu-mergekit.md
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import make_experts, word_tokenizer  # noqa: E402

WORDS = 1000


def _texts(task: str, count: int, rng: random.Random) -> list[str]:
    low, high = (4, WORDS // 2) if task == "math" else (WORDS // 2, WORDS)
    return [
        " ".join(f"w{rng.randrange(low, high)}" for _ in range(rng.randint(16, 64))) for _ in range(count)
    ]


def _run(args: list[str], log: list[dict]) -> str:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log.append({"command": " ".join(args), "seconds": round(seconds, 1)})
    return done.stderr + done.stdout


def _logits_drift(model, experts: dict, batches: dict) -> float:
    drifts = []
    with torch.no_grad():
        for task, expert in experts.items():
            keep = batches[task]["attention_mask"].bool()
            mine, theirs = model(**batches[task]).logits[keep], expert(**batches[task]).logits[keep]
            drifts.append(float((mine - theirs).norm() / theirs.norm()))
    return sum(drifts) / len(drifts)


def run(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=WORDS,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
    )
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(work / "models" / "base")
    tokenizer = word_tokenizer(WORDS)
    tokenizer.save_pretrained(work / "models" / "base")
    experts = dict(zip(["math", "code"], make_experts(base, 2, rel=0.2).values()))
    for task, expert in experts.items():
        expert.save_pretrained(work / "models" / task)
    (work / "ties.yml").write_text(
        f"merge_method: ties\nbase_model: {work}/models/base\nmodels:\n"
        f"  - model: {work}/models/math\n    parameters: {{weight: 0.5, density: 0.3}}\n"
        f"  - model: {work}/models/code\n    parameters: {{weight: 0.7, density: 0.3}}\n"
        "parameters: {normalize: true}\ndtype: float32\n"
    )
    rng = random.Random(0)
    held_out = {}
    for task in experts:
        (work / f"{task}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in _texts(task, 256, rng))
        )
        held_out[task] = tokenizer(_texts(task, 64, rng), padding=True, return_tensors="pt")

    log: list[dict] = []
    bin_dir = Path(sys.executable).parent
    _run(
        [str(bin_dir / "mergekit-yaml"), str(work / "ties.yml"), str(work / "merged"), "--allow-crimes"], log
    )
    featcal = [sys.executable, "-m", "featcal"]
    experts_arg = [f"math={work}/models/math:0.5", f"code={work}/models/code:0.7"]
    _run(
        [
            *featcal,
            "merge",
            "--method",
            "ties",
            "--trim",
            "per-tensor",
            "--density",
            "0.3",
            "--scaling",
            "1",
            "--base",
            str(work / "models" / "base"),
            "--experts",
            *experts_arg,
            "--out",
            str(work / "featcal-merged"),
        ],
        log,
    )
    from featcal.io.lazy_checkpoint import LazyCheckpoint

    theirs, ours = LazyCheckpoint(work / "merged"), LazyCheckpoint(work / "featcal-merged")
    difference = max(float((ours.read([k])[k] - theirs.read([k])[k]).abs().max()) for k in theirs.keys())
    for task in experts:
        _run(
            [
                *featcal,
                "data",
                "--model",
                str(work / "models" / "base"),
                str(work / f"{task}.jsonl"),
                "--out",
                str(work / f"{task}.safetensors"),
                "--samples",
                "256",
                "--quiet",
            ],
            log,
        )
    calibrated_dir = work / "calibrated"
    output = _run(
        [
            *featcal,
            "calibrate",
            "--merged",
            str(work / "merged"),
            "--out",
            str(calibrated_dir),
            "--quiet",
            "--data",
            *(f"{t}={work / f'{t}.safetensors'}" for t in experts),
        ],
        log,
    )
    merged = LlamaForCausalLM.from_pretrained(work / "merged").eval()
    calibrated = LlamaForCausalLM.from_pretrained(calibrated_dir).eval()
    report = json.loads((calibrated_dir / "featcal_report.json").read_text())
    card = (calibrated_dir / "README.md").read_text()
    for entry in log:
        entry["command"] = entry["command"].replace(sys.executable, "python").replace(f"{bin_dir}/", "")
        entry["command"] = entry["command"].replace(str(work), "<tmp>")
    output = output.replace(str(work), "<tmp>")
    result = {
        "commands": log,
        "max_abs_difference_featcal_vs_mergekit_ties": difference,
        "logits_drift": {
            "merged": _logits_drift(merged, experts, held_out),
            "calibrated": _logits_drift(calibrated, experts, held_out),
        },
        "blocks": [
            {k: b[k] for k in ("index", "drift_merged", "drift_calibrated")} for b in report["blocks"]
        ],
        "tasks": report["tasks"],
        "kept_files": sorted(p.name for p in calibrated_dir.iterdir() if not p.name.endswith(".safetensors")),
        "calibrate_output": output.strip().splitlines(),
        "torch": torch.__version__,
    }
    lines = [
        "# mergekit, then featcal, end to end (CPU)",
        "",
        "Command: `python bench/e2e_mergekit.py --markdown bench/results/cpu-mergekit.md`; the setup is "
        "in its docstring.",
        "",
        "| command | seconds |",
        "|---|---|",
        *(f"| `{c['command']}` | {c['seconds']} |" for c in log),
        "",
        f"`featcal merge --trim per-tensor` against mergekit's `ties`: largest difference {difference:.2e}.",
        "",
        f"Logits drift toward the experts on held-out texts: merged {result['logits_drift']['merged']:.4f}, "
        f"calibrated {result['logits_drift']['calibrated']:.4f}.",
        "",
        "`featcal calibrate` printed:",
        "",
        "```",
        *result["calibrate_output"],
        "```",
        "",
        "Files of the output besides the weights: " + ", ".join(f"`{n}`" for n in result["kept_files"]),
        "",
        "The end of its `README.md`, mergekit's model card with featcal's section appended:",
        "",
        "````markdown",
        card[card.index("## FeatCal calibration") :].replace(str(work), "<tmp>").rstrip(),
        "````",
        "",
    ]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="featcal-mergekit-") as work:
        run(Path(work))


if __name__ == "__main__":
    main()
