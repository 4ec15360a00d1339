"""Kernel timing on CUDA: the fused triton LoRA layer (forward + backward) against the floor and PEFT-style eager LoRA.

Rows: GPT-2 shapes K->N, M = 8192 tokens, bf16, r in {16, 128}, dropout in {0, 0.1}. Columns (median ms from
``triton.testing.do_bench``):

- floor: the frozen base layer alone, ``y = x Wᵀ + bias`` and ``dx = g W`` (2·2·M·K·N FLOPs);
- eager: what HF PEFT runs: base linear, ``nn.Dropout`` on a copy of x, ``x Aᵀ``, ``· Bᵀ``, scale, add; autograd;
- triton fused / triton split: :func:`lora_fast.lora_linear` with ``backend="triton"`` and each design.

Writes ``kernel_timing.md`` and ``kernel_timing.json`` (stamped with device, versions and date) under ``--out``.
"""

import argparse
import datetime
import json
import os
import pathlib

import torch
import triton

from lora_fast import lora_linear
from lora_fast.triton_backend import config

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (4096, 4096)]


def _eager(x, weight, bias, A, B, s, p):
    drop = torch.nn.functional.dropout(x, p) if p > 0 else x
    return torch.nn.functional.linear(x, weight, bias) + s * ((drop @ A.t()) @ B.t())


def _fwd_bwd(fn, x, g):
    def step():
        x.grad = None
        fn().backward(g)

    return step


def _time_row(M: int, K: int, N: int, r: int, p: float) -> dict:
    """Median ms of forward+backward for each variant at one shape (bf16, Conv1D-layout weight)."""
    dev, dt, s = "cuda", torch.bfloat16, 2.0
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(K, N, device=dev, dtype=dt) / K**0.5).t()  # Conv1D layout, read through strides
    b = torch.randn(N, device=dev, dtype=dt)
    A = (torch.randn(r, K, device=dev, dtype=dt) / K**0.5).requires_grad_()
    B = torch.randn(N, r, device=dev, dtype=dt).requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=dt)
    t = {"floor": triton.testing.do_bench(_fwd_bwd(lambda: torch.nn.functional.linear(x, w, b), x, g))}
    t["eager"] = triton.testing.do_bench(_fwd_bwd(lambda: _eager(x, w, b, A, B, s, p), x, g))
    triton_fn = lambda: lora_linear(x, w, b, A, B, s, dropout_p=p, seed=1, backend="triton")
    for name, fused in (("fused", True), ("split", False)):
        config.fused = fused
        t[name] = triton.testing.do_bench(_fwd_bwd(triton_fn, x, g))
    config.fused = True
    flops = 2 * 2 * M * K * N + 2 * 4 * M * r * (K + N)
    return {
        "K": K,
        "N": N,
        "r": r,
        "p": p,
        **{k: round(v, 4) for k, v in t.items()},
        "fused_over_floor": round(t["fused"] / t["floor"], 3),
        "eager_over_fused": round(t["eager"] / t["fused"], 3),
        "fused_tflops": round(flops / t["fused"] / 1e9, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"), help="folder for the .md and .json")
    ap.add_argument("--M", type=int, default=8192, help="tokens per call (batch·seq)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    M = args.M
    rows = []
    for K, N in SHAPES:
        for r in (16, 128):
            for p in (0.0, 0.1):
                rows.append(_time_row(M, K, N, r, p))
                print(rows[-1], flush=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "M": M,
        "dtype": "bf16",
        "timing": "triton.testing.do_bench median ms, forward+backward (dx, dA, dB)",
    }
    (out / "kernel_timing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = "| K→N | r | p | floor ms | eager ms | split ms | fused ms | fused/floor | eager/fused | fused TFLOP/s |"
    lines = [f"# LoRA layer fwd+bwd, {meta['device']}, M={M}, bf16", "", head, "|" + "---|" * 10]
    for rw in rows:
        lines.append(
            f"| {rw['K']}→{rw['N']} | {rw['r']} | {rw['p']} | {rw['floor']:.3f} | {rw['eager']:.3f} | "
            f"{rw['split']:.3f} | {rw['fused']:.3f} | {rw['fused_over_floor']} | {rw['eager_over_fused']} | "
            f"{rw['fused_tflops']} |"
        )
    (out / "kernel_timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
