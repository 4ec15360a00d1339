"""The GGUF dequantisation kernel compiled for real targets (``bench/compile_gguf.py --subset ci``): every packed
format, bf16 for sm_90 and fp32 for sm_80, fits and spills nothing. In its own process: the test session's
interpreter switch would make the kernel an interpreted function, which cannot be compiled for a GPU."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_gguf_dequant_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_gguf", "--subset", "ci"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gguf compile tier verified" in proc.stdout
    assert proc.stdout.count("| sm_90 |") == 6 and proc.stdout.count("| sm_80 |") == 6
