"""One LoRA linear layer, timed phase by phase against the floor (the frozen base layer alone).

Variants (letters as in STYLE.md: ``x (M, K)``, ``W (N, K)``, ``A (R, K)``, ``B (N, R)``, ``g = dL/dy``):

- ``floor``: ``F.linear(x, W, bias)`` with W and bias frozen: ``x·Wᵀ`` forward, ``g·W`` (dx only) backward.
- ``peft_eager``: lora-fast's ``reference`` backend, plain autograd over PEFT's eager formula.
- ``hf_peft``: HF PEFT's own ``peft.tuners.lora.Linear`` around an ``nn.Linear`` (when peft is installed).
- ``torch``: lora-fast's ``torch`` backend (explicit backward, dropout mask regenerated from a seed).
- ``triton``: lora-fast's ``triton`` backend (CUDA only; the CPU interpreter is no speed measure).

Phases: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (``y.backward(g)`` on a kept graph),
``fwd+bwd``. FLOPs counted (elementwise work such as dropout and the bias add is not counted):

    floor   fwd 2·M·K·N                    bwd 2·M·K·N (dx = g·W)
    LoRA    fwd 2·M·K·N + 2·M·R·(K+N)      bwd 2·M·K·N + 4·M·R·(K+N) (u = g·B, dB = gᵀ·h, dA = uᵀ·drop(x), u·A)

Memory: on CUDA, the ``torch.cuda.max_memory_allocated`` rise during one forward+backward over what the inputs and
``g`` already hold (so it includes y, dx, dA, dB and transients). On CPU no allocator high-water exists for tensors,
so the column is the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), counting each
storage once and leaving out the inputs' and parameters' own storages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import fmt_ms, fmt_ratio, markdown_table, sample_times, summarize
from lora_fast import lora_linear

__all__ = [
    "LayerCase",
    "PreparedVariant",
    "cases",
    "flops",
    "measure_case",
    "run_layer_bench",
    "layer_summary",
    "layer_tables",
    "VARIANTS",
]

VARIANTS = ("floor", "peft_eager", "hf_peft", "torch", "triton")
SHAPES_FULL = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1024, 3072), (4096, 4096)]
SHAPES_QUICK = {"cpu": [(768, 2304), (3072, 768)], "cuda": [(768, 2304), (4096, 4096)]}
ALPHA_OVER_R = 2.0  # s = alpha / r = 2, as with r=16, alpha=32


@dataclass(frozen=True)
class LayerCase:
    M: int
    K: int
    N: int
    R: int
    p: float
    dtype: torch.dtype


def cases(device: str, quick: bool, dtype: str = "fp32") -> list[LayerCase]:
    """The grid of the brief: GPT-2 small/medium layers and 4096², r ∈ {16, 128}, dropout ∈ {0, 0.1}; bf16 and fp32
    on CUDA; on CPU fp32, and bf16 too when ``dtype`` (bench/run.py's ``--dtype``, resolved) is ``"bf16"``. M = 8·128
    tokens on CPU, 16·512 on CUDA. ``quick`` keeps a few shapes, r=16, one dtype (bf16 on CUDA, ``dtype`` on CPU)."""
    M = 16 * 512 if device == "cuda" else 8 * 128
    shapes = SHAPES_QUICK[device] if quick else SHAPES_FULL
    ranks = [16] if quick else [16, 128]
    half = device == "cuda" or dtype == "bf16"
    dtypes = [torch.bfloat16] if quick and half else ([torch.bfloat16, torch.float32] if half else [torch.float32])
    return [LayerCase(M, K, N, R, p, dt) for dt, (K, N), R, p in itertools.product(dtypes, shapes, ranks, (0.0, 0.1))]


def flops(case: LayerCase, variant: str, phase: str) -> float:
    M, K, N, R = case.M, case.K, case.N, case.R
    base = 2.0 * M * K * N
    lora_fwd = 0.0 if variant == "floor" else 2.0 * M * R * (K + N)
    lora_bwd = 2.0 * lora_fwd
    return {"fwd": base + lora_fwd, "bwd": base + lora_bwd, "fwd+bwd": 2 * base + lora_fwd + lora_bwd}[phase]


# ---------------------------------------------------------------- the variants as (inputs -> forward closure)


def _hf_peft_forward(x, weight, bias, lora_A, lora_B, scaling, p):
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError:
        return None
    N, K = weight.shape
    R = lora_A.shape[0]
    base = torch.nn.Linear(K, N, device=x.device, dtype=x.dtype)
    # The frozen weight and bias over the very storages of W and bias: no copy, so no variant's memory counts them.
    base.weight = torch.nn.Parameter(weight, requires_grad=False)
    base.bias = torch.nn.Parameter(bias, requires_grad=False)
    layer = PeftLinear(
        base, "default", config=LoraConfig(r=R, lora_alpha=scaling * R, lora_dropout=p), r=R, lora_alpha=scaling * R
    )
    # Parameters over the very storages of A and B, so every variant trains identical values.
    layer.lora_A["default"].weight = torch.nn.Parameter(lora_A.detach())
    layer.lora_B["default"].weight = torch.nn.Parameter(lora_B.detach())
    layer.train()
    return lambda: layer(x), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def make_forward(
    variant: str, x, weight, bias, lora_A, lora_B, scaling, p
) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]] | None:
    """``(closure computing y, tensors that receive gradients)`` for ``variant``, or None where it cannot run here."""
    if variant == "floor":
        return lambda: F.linear(x, weight, bias), [x]
    if variant == "hf_peft":
        return _hf_peft_forward(x, weight, bias, lora_A, lora_B, scaling, p)
    backend = {"peft_eager": "reference", "torch": "torch", "triton": "triton"}[variant]
    if backend == "triton":
        if x.device.type != "cuda":
            return None
        try:
            lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, True, 0, backend="triton")
        except (ImportError, NotImplementedError, RuntimeError) as err:
            print(f"  (triton backend unavailable: {type(err).__name__}: {err})")
            return None
    return (
        lambda: lora_linear(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p=p, training=True, seed=1234, backend=backend
        ),
        [x, lora_A, lora_B],
    )


# ---------------------------------------------------------------- measuring one variant


def _inputs(case: LayerCase, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=case.dtype)
        return t.requires_grad_(grad)

    x = rnd(case.M, case.K, grad=True)
    weight = rnd(case.N, case.K, scale=case.K**-0.5)
    bias = rnd(case.N, scale=0.1)
    # Random (non-zero) B, so no product is trivially zero.
    lora_A = rnd(case.R, case.K, scale=case.K**-0.5, grad=True)
    lora_B = rnd(case.N, case.R, scale=case.R**-0.5, grad=True)
    g = rnd(case.M, case.N)
    return x, weight, bias, lora_A, lora_B, g


def _saved_bytes(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes autograd saves for backward, each storage once, the inputs' own storages left out."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values())


def _cuda_peak_bytes(forward: Callable[[], torch.Tensor], g: torch.Tensor, params: list[torch.Tensor]) -> int:
    for t in params:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward().backward(g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for t in params:
        t.grad = None
    return peak


class PreparedVariant:
    """One variant of one case, ready to time: its forward, a kept graph for ``bwd``, its memory figure."""

    def __init__(self, case: LayerCase, variant: str, device: str):
        x, weight, bias, lora_A, lora_B, g = _inputs(case, device)
        made = make_forward(variant, x, weight, bias, lora_A, lora_B, ALPHA_OVER_R, case.p)
        self.ok = made is not None
        if not self.ok:
            return
        forward, params = made
        if device == "cuda":
            self.mem = _cuda_peak_bytes(forward, g, params)
        else:
            self.mem = _saved_bytes(forward, [x, weight, bias, lora_A, lora_B, g])
        y_kept = forward()

        def clear():
            for t in params:
                t.grad = None

        def bwd():
            clear()
            y_kept.backward(g, retain_graph=True)

        def fwd_bwd():
            clear()
            forward().backward(g)

        self.phases = {"fwd": forward, "bwd": bwd, "fwd+bwd": fwd_bwd}


def measure_case(
    case: LayerCase, variants: tuple[str, ...], device: str, min_run_time: float, rounds: int
) -> list[dict]:
    """Rows for every variant × phase of ``case``. The variants are interleaved in ``rounds`` rounds of
    ``min_run_time / rounds`` seconds each and the samples pooled, so load drift on a shared machine hits all alike."""
    prepared = {v: PreparedVariant(case, v, device) for v in variants}
    prepared = {v: p for v, p in prepared.items() if p.ok}
    rows = []
    for phase in ("fwd", "bwd", "fwd+bwd"):
        samples: dict[str, list[float]] = {v: [] for v in prepared}
        for _ in range(rounds):
            for v, prep in prepared.items():
                samples[v] += sample_times(prep.phases[phase], device, min_run_time / rounds)
        for v, prep in prepared.items():
            t = summarize(samples[v], device)
            f = flops(case, v, phase)
            rows.append(
                {
                    "M": case.M,
                    "K": case.K,
                    "N": case.N,
                    "R": case.R,
                    "dropout": case.p,
                    "dtype": str(case.dtype).removeprefix("torch."),
                    "variant": v,
                    "phase": phase,
                    "median_ms": t.median_ms,
                    "lo_ms": t.lo_ms,
                    "hi_ms": t.hi_ms,
                    "samples": t.samples,
                    "flops": f,
                    "tflops": f / (t.median_ms * 1e-3) / 1e12,
                    "mem_bytes": prep.mem,
                    "mem_kind": "cuda_peak_delta" if device == "cuda" else "saved_tensors",
                }
            )
    return rows


def run_layer_bench(
    device: str,
    quick: bool,
    min_run_time: float | None = None,
    variants: tuple[str, ...] = VARIANTS,
    dtype: str = "fp32",
) -> list[dict]:
    """Every case of :func:`cases` for every variant (the floor measured beside each), with the two ratios."""
    if min_run_time is None:
        min_run_time = (0.6 if quick else 1.0) if device == "cpu" else (0.1 if quick else 0.3)
    rounds = 3 if quick else 5
    rows: list[dict] = []
    for case in cases(device, quick, dtype):
        print(f"  layer M={case.M} K={case.K} N={case.N} R={case.R} dropout={case.p} {case.dtype}", flush=True)
        case_rows = measure_case(case, variants, device, min_run_time, rounds)
        _add_ratios(case_rows)
        rows += case_rows
    return rows


def _add_ratios(case_rows: list[dict]) -> None:
    by = {(r["variant"], r["phase"]): r["median_ms"] for r in case_rows}
    peft = "hf_peft" if any(v == "hf_peft" for v, _ in by) else "peft_eager"
    for r in case_rows:
        floor, ref = by.get(("floor", r["phase"])), by.get((peft, r["phase"]))
        r["vs_floor"] = r["median_ms"] / floor if floor else None
        r["vs_peft"] = r["median_ms"] / ref if ref else None
        r["peft_baseline"] = peft


# ---------------------------------------------------------------- tables


def _groups(rows: list[dict]) -> Iterator[tuple[tuple, list[dict]]]:
    keys: dict[tuple, list[dict]] = {}
    for r in rows:
        keys.setdefault((r["dtype"], r["K"], r["N"], r["R"], r["dropout"], r["M"]), []).append(r)
    yield from keys.items()


def layer_tables(rows: list[dict], device: str) -> str:
    """One markdown table per (dtype, shape, R, dropout): variants × phases."""
    mem_head = "peak extra MiB (CUDA)" if device == "cuda" else "saved for bwd MiB"
    spread = "p20–p80" if device == "cuda" else "IQR"
    out = []
    for (dtype, K, N, R, p, M), group in _groups(rows):
        table = []
        for r in group:
            table.append(
                [
                    r["variant"],
                    r["phase"],
                    fmt_ms(r["median_ms"]),
                    f"{r['lo_ms']:.3g}–{r['hi_ms']:.3g}",
                    fmt_ratio(r["vs_floor"]),
                    fmt_ratio(r["vs_peft"]),
                    f"{r['tflops']:.2f}",
                    f"{r['mem_bytes'] / 2**20:.1f}",
                ]
            )
        out.append(
            f"**{dtype}, M={M}, K={K} → N={N}, R={R}, dropout={p}**\n\n"
            + markdown_table(
                [
                    "variant",
                    "phase",
                    "median ms",
                    f"{spread} ms",
                    "vs floor",
                    f"vs {group[-1]['peft_baseline']}",
                    "TFLOP/s",
                    mem_head,
                ],
                table,
            )
        )
    return "\n\n".join(out)


def layer_summary(rows: list[dict]) -> str:
    """One line per case: forward+backward median ms of each variant, its ratio to the floor, and saved/peak MiB."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    table = []
    for (dtype, K, N, R, p, M), group in _groups(rows):
        by = {r["variant"]: r for r in group if r["phase"] == "fwd+bwd"}
        line = [dtype, str(M), f"{K}→{N}", str(R), f"{p:g}"]
        for v in variants:
            r = by.get(v)
            line.append("–" if r is None else f"{fmt_ms(r['median_ms'])} ({r['vs_floor']:.2f}×)")
        for v in variants[1:]:
            r = by.get(v)
            line.append("–" if r is None else f"{r['mem_bytes'] / 2**20:.1f}")
        table.append(line)
    head = ["dtype", "M", "K→N", "R", "dropout"] + [f"{v} ms (×floor)" for v in variants]
    head += [f"{v} MiB" for v in variants[1:]]
    return markdown_table(head, table)
