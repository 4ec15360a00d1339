"""bench/device_check.sh, the one script a lent GPU runs, kept working on a CPU machine: ``DRY_RUN=1`` runs every
step (tiny shapes, Triton's interpreter, the CUDA tier collected and skipped, the main job for 2 steps), and a
failing step must make the script fail."""

import json
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "bench" / "device_check.sh"


def _env(tmp_path: pathlib.Path, **extra) -> dict:
    env = dict(os.environ, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    # python3 must be this interpreter (the virtual environment with the checkout installed).
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_dry_run_runs_every_step(real_data_dir, tmp_path):
    # The script reads the real data folder (DEVICE_DATA holds gpt2-tokenizer/ and rotten_tomatoes/): data tier.
    env = _env(tmp_path, DRY_RUN="1", DEVICE_DATA=str(real_data_dir.parent))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device check: all steps passed" in proc.stdout
    timing = json.loads((out / "kernel_timing.json").read_text())
    assert len(timing["rows"]) == 2
    for row in timing["rows"]:  # every design's passes, each kernel of them with its configuration
        assert set(row["designs"]) == {"fused", "split", "hybrid"} and row["floor"]["forward"] > 0
        kernels = [k for d in row["designs"].values() for ks in d["kernels"].values() for k in ks]
        assert {"_lora_dx_kernel", "_lora_skinny_kernel"} <= {k["kernel"] for k in kernels}
        assert all(k["ms"] > 0 and k["candidate"] == 0 and k["config"] for k in kernels)
    # The measured design table loads as auto's table for this device, one row per timing row.
    from lora_fast.kernels import designs

    table = designs.load_table(out / "designs.json")
    assert table["device"] == timing["meta"]["device"] and sum(map(len, table["rows"].values())) == 2
    # Every timed pass paired with its launches in the cost model's plans, and the model fitted to them (under the
    # interpreter the Triton GEMMs are slower than any byte bound only by chance: no count asked of them here).
    calibration = timing["meta"]["calibration"]
    assert calibration["unpaired"] == [], calibration["unpaired"]
    assert calibration["samples"]["cublas"] == 4 and calibration["samples"]["hbm"] > 0, calibration
    assert table["machine"].name == f"{table['device']} (calibrated)"
    suite = ET.parse(out / "pytest_cuda.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("skipped")) == int(suite.get("tests"))  # collected, skipped
    assert json.loads((out / "train_summary.json").read_text())
    log = (out / "device_check.log").read_text()
    assert log.count("exit 0 after") == 5, log[-2000:]  # import, timing, pytest, tiny model, train


def test_worst_case_fits_six_minutes():
    """Every step runs under `timeout -k 5 LIMIT`: killed at its limit (and 5 s later if it ignores SIGTERM), the
    whole check ends within 6 minutes, so a 15-minute GPU lease leaves room to run it again."""
    text = SCRIPT.read_text()
    assert 'timeout -k 5 "$limit" "$@"' in text
    limits = [int(v) for v in re.findall(r"\brun [a-z_]+ (\d+) ", text)]
    assert len(limits) == 6, limits  # install, import, kernel_timing, pytest_cuda, tiny_model, train
    assert sum(limits) + 5 * len(limits) <= 360, limits


def test_failing_import_stops_the_script_with_failure(tmp_path):
    """pipefail and the exit status are honest: a python3 that fails makes the script stop and exit 1."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'ImportError: no lora_fast' >&2\nexit 3\n")
    (fake / "python3").chmod(0o755)
    env = _env(tmp_path, DRY_RUN="1")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "does not import; stopping" in proc.stderr
    assert "== import: exit 3" in (tmp_path / "out" / "device_check.log").read_text()
