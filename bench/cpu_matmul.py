"""Is bf16 faster than fp32 on this CPU? The three products of one GPT-2 ``c_attn`` layer (M = 1024 tokens, K = 768,
N = 2304), timed in fp32 and in bf16: the measurement behind ``--dtype auto`` (``lora_fast.precision``).

    python -m bench.cpu_matmul                                   # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python -m bench.cpu_matmul    # oneDNN denied the bf16 instructions (emulated bf16)

Products (letters of STYLE.md): forward ``x Wᵀ``, backward ``g W`` (dx) and ``gᵀ x`` (what a trained W would need),
2·M·K·N FLOPs each. Median of ``torch.utils.benchmark`` blocks (``bench.common.time_fn``), the two dtypes interleaved
in rounds so the load of a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `lora_fast` importable from the checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import environment, markdown_table, sample_times, summarize  # noqa: E402
from lora_fast.precision import cpu_bf16_support  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=1024, help="tokens M (default 1024: GPT-2's 8 × 128 of the bench)")
    ap.add_argument("--k", type=int, default=768, help="in_features K")
    ap.add_argument("--n", type=int, default=2304, help="out_features N")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per product and dtype, over 4 rounds")
    args = ap.parse_args(argv)
    M, K, N = args.m, args.k, args.n
    gen = torch.Generator().manual_seed(0)
    x, W, g = (torch.randn(*shape, generator=gen) for shape in ((M, K), (N, K), (M, N)))
    products = {"x Wᵀ (forward)": lambda x, W, g: x @ W.t(), "g W (dx)": lambda x, W, g: g @ W,
                "gᵀ x (dW)": lambda x, W, g: g.t() @ x}  # fmt: skip
    rows = []
    for name, product in products.items():
        inputs = {dt: [t.to(dt) for t in (x, W, g)] for dt in (torch.float32, torch.bfloat16)}
        samples: dict[torch.dtype, list[float]] = {dt: [] for dt in inputs}
        for _ in range(4):
            for dt, ts in inputs.items():
                samples[dt] += sample_times(lambda f=product, ts=ts: f(*ts), "cpu", args.seconds / 4)
        ms = {dt: summarize(s, "cpu").median_ms for dt, s in samples.items()}
        rows.append({"product": name, "fp32_ms": ms[torch.float32], "bf16_ms": ms[torch.bfloat16]})
    support = cpu_bf16_support()
    cap = {k: v for k, v in os.environ.items() if k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env = environment("cpu")
    print(f"{env['device']}; torch {env['versions']['torch']}; {env['date']}")
    print(f"bf16: {support.reason} (torch ISA {support.isa}, AMX tiles {support.amx_tile}, avx512_bf16 "
          f"{support.avx512_bf16}){'; ' + str(cap) if cap else ''}")  # fmt: skip
    table = [[r["product"], f"{r['fp32_ms']:.2f}", f"{r['bf16_ms']:.2f}", f"{r['bf16_ms'] / r['fp32_ms']:.2f}×"]
             for r in rows]  # fmt: skip
    print(f"\nM={M}, K={K}, N={N}, {torch.get_num_threads()} threads, median ms\n")
    print(markdown_table(["product", "fp32 ms", "bf16 ms", "bf16 / fp32"], table))
    return rows


if __name__ == "__main__":
    main()
