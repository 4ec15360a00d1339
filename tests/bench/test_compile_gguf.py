"""The GGUF dequantisation kernel compiled for real targets (``bench/compile_gguf.py --subset ci``): every packed
format, bf16 for sm_90 and fp32 for sm_80, fits and spills nothing. In its own process: the test session's
interpreter switch would make the kernel an interpreted function, which cannot be compiled for a GPU."""

from tests.helpers import run_compile_tier


def test_gguf_dequant_kernel_compiles_for_sm90_and_sm80():
    proc = run_compile_tier("bench.compile_gguf", "--subset", "ci")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gguf compile tier verified" in proc.stdout
    assert proc.stdout.count("| sm_90 |") == 6 and proc.stdout.count("| sm_80 |") == 6
