"""The offline compile tier (bench/compile_check.py) in CI, in about a minute: the committed full results
(``bench/results/compile_tier.json``: every dtype × rank × dropout × design on sm_90 and sm_80, about an hour of one
core) must cover every case, pass the tier's checks and come from today's kernels; the headline case is compiled live
for sm_90 and must match them; fp32 at R = 256 must fit sm_80; the dropout-mask probe must cost what the cost model
assumes. It runs in its own process: the test session's interpreter switch would turn the kernels into interpreted
functions, which cannot be compiled for a GPU.
"""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_compile_tier_verifies():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", "--verify"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile tier verified" in proc.stdout
