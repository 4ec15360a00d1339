"""``python -m bench.parallel_step`` (one process, DDP and FSDP2 on 2 CPU processes) runs end to end on a tiny GPT-2:
every row gives a time per step and memory per process, the FSDP processes each hold about half of the weights, and
the JSON and Markdown files are written."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import OFFLINE_ENV, ROOT


@pytest.mark.slow
def test_the_three_rows_run_and_fsdp_holds_half_the_weights(tiny_gpt2, tmp_path):
    out = tmp_path / "parallel.json"
    cmd = [sys.executable, "-m", "bench.parallel_step", "--model", str(tiny_gpt2), "--nproc", "2", "--global-batch",
           "4", "--seq", "16", "--warmup", "0", "--steps", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"one", "ddp", "fsdp"}
    assert [len(rows[r]["processes"]) for r in ("one", "ddp", "fsdp")] == [1, 2, 2]
    for r in rows.values():
        assert all(p["s_per_step"] > 0 for p in r["processes"])
    whole = rows["one"]["processes"][0]["weights_mb_this_process"]
    for p in rows["fsdp"]["processes"]:
        assert 0.4 * whole <= p["weights_mb_this_process"] <= 0.6 * whole, (p["weights_mb_this_process"], whole)
    assert "fsdp ×2" in out.with_suffix(".md").read_text()
