"""The ahead-of-time compile check (featcal.kernels.compile_check) against the committed table
bench/results/compile-check.json: a sample of its rows compiled afresh for sm_80 and sm_90 with
Triton's ptxas, no GPU needed. It runs in a subprocess, where TRITON_INTERPRET is 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "compile-check.json"


def _check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "featcal.kernels.compile_check", "--jobs", "2", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_committed_table_holds_and_a_sample_compiles_as_it_says():
    proc = _check("--verify", str(TABLE), "--sample", "6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the table holds" in proc.stdout
    rows = json.loads(TABLE.read_text())["rows"]
    assert {r["arch"] for r in rows} == {80, 90}
    assert all(r["status"] in ("ok", "pruned") for r in rows)
    assert any(r["matrix_units"] == "wgmma" for r in rows if r["arch"] == 90)
    assert any(r["matrix_units"] == "mma" for r in rows if r["arch"] == 80)


def test_verify_finds_a_row_that_does_not_reproduce_and_a_stale_table(tmp_path):
    data = json.loads(TABLE.read_text())
    largest = max((r for r in data["rows"] if r["status"] == "ok"), key=lambda r: r["shared"])
    largest["registers"] += 1  # compiled afresh every time: it is its kernel's largest
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    proc = _check("--verify", str(wrong), "--sample", "0")
    assert proc.returncode == 1
    assert "the table says" in proc.stdout and largest["config"] in proc.stdout

    data["rows"] = data["rows"][1:]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(data))
    proc = _check("--verify", str(stale), "--sample", "0")
    assert proc.returncode == 1 and "is stale" in proc.stdout and "not in the table" in proc.stdout


def test_bad_arguments_are_refused_with_status_2():
    proc = _check("--arch", "75")
    assert proc.returncode == 2 and "no shared-memory limit known for sm_75" in proc.stderr
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "featcal.kernels.compile_check"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
