"""The compile tier's cases: targets, dtypes, ranks and designs (:mod:`bench.compile_check` compiles them,
:mod:`bench.compile_report` checks and tabulates them)."""

import torch

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), and SM counts.
TARGETS = {
    90: dict(name="sm_90 (H100)", shared=232448, sms=132),
    80: dict(name="sm_80 (A100)", shared=166912, sms=108),
    86: dict(name="sm_86 (A40)", shared=101376, sms=84),
    89: dict(name="sm_89 (L40S)", shared=101376, sms=142),
    100: dict(name="sm_100 (B200)", shared=232448, sms=148),
    120: dict(name="sm_120 (RTX 5090)", shared=101376, sms=170),
}
MAIN_TARGETS = (90, 80)
# name: (dtype of x and W, dtype of A and B, LoRA compute dtype, fp32 dot precision)
DTYPES = {
    "fp32-tf32": (f32, f32, f32, "tf32"),
    "fp32-ieee": (f32, f32, f32, "ieee"),
    "fp16": (f16, f16, f16, "tf32"),
    "bf16": (bf16, bf16, bf16, "tf32"),
    "bf16+fp32": (bf16, f32, f32, "ieee"),  # PEFT's default: fp32 LoRA weights, no autocast, fp32 at "highest"
    "bf16+fp32-tf32": (bf16, f32, f32, "tf32"),  # the same with torch.set_float32_matmul_precision("high")
    "fp16+fp32": (f16, f32, f32, "ieee"),
    "bf16+fp32-autocast": (bf16, f32, bf16, "tf32"),  # under bf16 autocast: the LoRA branch computes in bf16
    "bf16-dbias": (bf16, bf16, bf16, "tf32"),  # a trainable bias (dbias); every other case has a frozen one
}
PLAIN = ("fp32-tf32", "fp32-ieee", "fp16", "bf16")
MIXED = ("bf16+fp32", "bf16+fp32-tf32", "fp16+fp32", "bf16+fp32-autocast", "bf16-dbias")
RANKS = (4, 8, 16, 32, 64, 128, 256)
DESIGNS = ("fused", "split", "hybrid")


def grid() -> list[tuple[str, int, int]]:
    """(dtype, R, arch) of every case, before dropout and design."""
    cases = [(d, r, a) for a in MAIN_TARGETS for d in PLAIN for r in RANKS]
    cases += [(d, r, a) for a in MAIN_TARGETS for d in MIXED for r in RANKS if r <= 64]
    other = [a for a in TARGETS if a not in MAIN_TARGETS]
    cases += [(d, r, a) for a in other for d in ("bf16", "fp32-tf32", "fp32-ieee", "bf16+fp32") for r in (16, 64)]
    return cases


# The fallback tiles must fit the smallest per-block shared memory of the GPUs Triton supports (sm_86/89/120: 99 KB).
FALLBACK_SHARED = 101376
M, K, N = 8192, 768, 2304
CI_SUBSET = [("bf16", 16, 90), ("fp32-ieee", 256, 80), ("bf16+fp32", 16, 90)]
