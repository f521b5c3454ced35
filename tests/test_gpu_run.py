"""The prepared GPU run (bench/gpu/run.py), checked on the CPU: its plan fits the budget, a step
past its limit is stopped and recorded, results are written as each step ends, and a machine
without a GPU is told so."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "run.py"


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_run"]


def test_dry_run_lists_every_step_within_the_budget():
    proc = subprocess.run([sys.executable, str(RUN), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = "extension cuda-tests kernels block-statistics solves clip-b32-ta8 llama3-8b-block"
    for step in steps.split():
        assert step in proc.stdout
    assert "TRITON_INTERPRET=0" in proc.stdout
    total = proc.stdout.strip().splitlines()[-1].split()
    assert total[0] == "total" and int(total[1]) <= 540 and int(total[2]) <= int(total[1])


def test_steps_are_chosen_by_name(gpu_run):
    assert [s.name for s in gpu_run.select("solves,kernels")] == ["kernels", "solves"]
    with pytest.raises(SystemExit, match="unknown step 'nope'"):
        gpu_run.select("nope")


def test_a_step_past_its_limit_is_stopped_and_its_log_kept(gpu_run, tmp_path):
    code = "import time; print('started', flush=True); time.sleep(30)"
    step = gpu_run.Step("sleepy", [sys.executable, "-c", code], limit=1, estimate=1)
    outcome = gpu_run.run_step(step, tmp_path)
    assert outcome.status == "timed out" and outcome.returncode is None and outcome.seconds < 10
    assert "started" in (tmp_path / "sleepy.log").read_text()
    done = gpu_run.run_step(gpu_run.Step("quick", [sys.executable, "-c", "print(2 + 2)"], 10, 1), tmp_path)
    assert done.status == "passed" and done.returncode == 0 and "4" in done.tail


def test_without_a_gpu_nothing_runs_and_the_status_is_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RUN), "--out", str(tmp_path), "--only", "solves"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "no CUDA device" not in proc.stderr:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2 and not list(tmp_path.iterdir())


def test_results_folder_names(gpu_run):
    assert gpu_run.slug("NVIDIA H200") == "h200"
    assert gpu_run.slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert gpu_run.slug(None) == "no-gpu"


def test_the_run_record_is_written_after_every_step(gpu_run, tmp_path, monkeypatch):
    steps = [
        gpu_run.Step("one", [sys.executable, "-c", "print(1)"], 10, 1),
        gpu_run.Step("two", [sys.executable, "-c", "raise SystemExit(3)"], 10, 1),
        gpu_run.Step("three", [sys.executable, "-c", "print(3)"], 10, 10**6),  # over the budget
    ]
    monkeypatch.setattr(gpu_run, "STEPS", steps)
    monkeypatch.setattr(gpu_run, "environment", lambda: {"device": "Fake GPU"})
    assert gpu_run.main(["--out", str(tmp_path), "--budget", "100"]) == 1
    record = json.loads((tmp_path / "run.json").read_text())
    assert [(s["name"], s["status"]) for s in record["steps"]] == [
        ("one", "passed"), ("two", "failed"), ("three", "skipped")
    ]  # fmt: skip
    assert record["steps"][1]["returncode"] == 3 and record["environment"]["device"] == "Fake GPU"


def test_the_checkout_is_importable_as_installed_through_links(gpu_run, tmp_path):
    """A step runs in the mirror, where featcal.kernels and featcal.csrc resolve to kernels/ and
    csrc/ without an installation (this machine's editable install is set aside)."""
    mirror = gpu_run.link_package(tmp_path / "mirror")
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        "import featcal, featcal.csrc, featcal.kernels.autotune as a; print(featcal.__file__, a.__file__)"
    )
    step = gpu_run.Step("import", [sys.executable, "-c", code], 120, 1, {"TRITON_INTERPRET": "1"})
    outcome = gpu_run.run_step(step, tmp_path, mirror)
    assert outcome.status == "passed", outcome.tail
    package, kernel = outcome.tail.split()
    assert (
        package.startswith(str(mirror))
        and Path(kernel).resolve() == RUN.parents[2] / "kernels" / "autotune.py"
    )
    assert (mirror / "tests" / "conftest.py").is_file() and (mirror / "bench" / "gpu" / "run.py").is_file()
