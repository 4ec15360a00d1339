"""The compile tier's checks and tables (cases from :mod:`bench.compile_check`)."""

from __future__ import annotations

import pathlib

import triton

from bench.compile_cases import DTYPES, FALLBACK_SHARED, MAIN_TARGETS, MIXED, PLAIN, RANKS, TARGETS, K, M, N
from lora_fast.kernels import cost, designs, tiles
from lora_fast.kernels.utils import block_r

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "KERNELS.md"
GEMMS = ("_lora_forward_kernel", "_lora_dx_kernel")
SIXTEEN = {name for name, (base, *_) in DTYPES.items() if base.itemsize == 2}  # a 16-bit base product
# The 16-bit main loops (bf16, fp16, and bf16 autocast over fp32 LoRA weights) must keep their wgmmas in flight (at
# most one wait per iteration) at every rank up to 128 (at R = 256 the fused kernels do not: docs/KERNELS.md), with
# a trainable bias too.
_TO_128 = (4, 8, 16, 32, 64, 128)
WAITS = {"bf16": _TO_128, "fp16": _TO_128, "bf16+fp32-autocast": _TO_128, "bf16-dbias": _TO_128}
# fp32 rank work without autocast: on sm_100 the fused kernels take 16 warps and mma.sync from a padded rank of
# tiles.SM100_FMA_FUSED_MMA_SYNC_RANK (kernels/tiles.py), so they are not held to tcgen05 there.
FMA_RANK_WORK = ("bf16+fp32", "bf16+fp32-tf32", "fp16+fp32")


def _fma_fused_wide(case: dict) -> bool:
    """A fused design with fp32 rank work without autocast at a rank whose sm_100 tiles run mma.sync (the table's
    bound, read from kernels/tiles.py)."""
    wide = block_r(case["R"]) >= tiles.SM100_FMA_FUSED_MMA_SYNC_RANK
    return case["dtype"] in FMA_RANK_WORK and case["design"] == "fused" and wide


def main_loops(kernel: str, switches: dict, loops: list) -> list:
    """The main loops (over the reduction dimension) among a compile's MMA loops, in address order: the split
    forward's K loop comes before its epilogue's rank-chunk loop, the split dx's N loop after its prologue's; the
    hybrid LoRA-term kernel has only a rank-chunk loop (one pass for R <= 64 in 16-bit). Rank-chunk loops run
    cdiv(R, R_CHUNK) times, once for R <= 64 at 16 bits, so their waits do not hold a pipeline back."""
    if kernel == "_lora_rank_out_kernel":
        return []
    if kernel == "_lora_forward_kernel" and switches.get("FUSE_H") == "False":
        return loops[:1]
    if kernel == "_lora_dx_kernel" and switches.get("FUSE_U") == "False":
        return loops[-1:]
    return loops


def _spill(stats: dict) -> int:
    return (stats["spill_stores"] or 0) + (stats["spill_loads"] or 0)


def check(cases: list[dict], probes: dict, fallbacks: list[dict] = ()) -> list[str]:
    """The tier's assertions; returns the failures (empty when all hold)."""
    failures = []
    for case in fallbacks:
        for launch in case["launches"]:
            if launch["chosen"] is None:
                shared = launch["tried"][-1]["shared"]
                failures.append(f"fallback of {launch['kernel']} ({case['dtype']}, R=256): {shared} B > 99 KB")
    for case in cases:
        tag = f"{case['dtype']} R={case['R']} p={case['p']} {case['design']} sm_{case['arch']}"
        limit = TARGETS[case["arch"]]["shared"]
        for launch in case["launches"]:
            if launch["chosen"] is None:
                failures.append(f"{tag} {launch['kernel']}: no configuration fits {limit} B")
            for tried in launch["tried"]:
                where = f"{tag} {launch['kernel']} {tried['config']}"
                # R <= 64: every tile of the table fits (no launch falls back); above, one configuration does.
                if case["R"] <= 64 and tried["shared"] > limit:
                    failures.append(f"{where}: needs {tried['shared']} B > {limit} B (it would fall back here)")
                if case["R"] <= 64 and _spill(tried):
                    failures.append(f"{where}: spills {_spill(tried)} B")
                if launch["kernel"] in GEMMS and case["dtype"] in SIXTEEN:
                    if case["arch"] == 90 and not tried["wgmma"]:
                        failures.append(f"{where}: no wgmma on sm_90")
                    if case["arch"] == 100 and not tried.get("tcgen05") and not _fma_fused_wide(case):
                        failures.append(f"{where}: no tcgen05 MMA on sm_100")
                if case["arch"] == 90 and case["R"] in WAITS.get(case["dtype"], ()):
                    waits = max((w for _, w in main_loops(launch["kernel"], launch["switches"], tried["mma_loops"])),
                                default=0)  # fmt: skip
                    if waits > 1:
                        failures.append(f"{where}: {waits} wgmma waits per main-loop iteration")
    for arch, probe in probes.items():
        now, before = rng_per_element(probe, new=True), rng_per_element(probe, new=False)
        if now > before / 4:
            failures.append(f"sm_{arch}: mask instructions per element {now} > 1/4 of {before}")
    return failures


def rng_per_element(probe: dict, new: bool, p: float = 0.1) -> float:
    """Mask instructions per element of x, forward + backward, at the headline shape (bf16, R = 16): draws per
    element of each pass (from the cost model's plans of ``auto``) × the probe's instructions per draw. The first
    design drew once per N tile in the fused forward (BLOCK_N = 128), once in dx and once in dA, with ``tl.rand``."""
    if not new:
        return round(probe["tl.rand"] * (triton.cdiv(N, 128) + 2), 1)
    s = cost.Shape(M, N, K, 16, p)
    draws = sum(launch.draws for launch in cost.forward_plan(s, designs.predicted("forward", s)))
    draws += sum(launch.draws for launch in cost.backward_plan(s, designs.predicted("backward", s)))
    return round(probe["keep_mask"] * draws / (M * K), 1)


def _auto(case: dict) -> dict:
    base, _, lora, precision = DTYPES[case["dtype"]]
    s = cost.Shape(M, N, K, case["R"], case["p"], base, lora, precision)
    return {
        pass_: designs.choose(pass_, "auto", s, designs.hybrid_supported(base)) for pass_ in ("forward", "backward")
    }


def summary_rows(cases: list[dict]) -> dict[tuple, dict]:
    """Per (dtype, R, arch): every table tile fits, worst shared memory / registers / spills (all designs, and those
    ``auto`` launches), MMA instructions of the GEMMs, worst wgmma waits per main-loop iteration."""
    rows: dict[tuple, dict] = {}
    for case in cases:
        row = rows.setdefault((case["dtype"], case["R"], case["arch"]), dict(fits=True, shared=0, registers=0,
                              spills=0, spills_auto=0, wgmma=True, tcgen05=True, mma=True, waits=0,
                              fused_mma_sync=False))  # fmt: skip
        auto = _auto(case)
        for launch in case["launches"]:
            row["fits"] &= launch["chosen"] is not None
            for tried in launch["tried"]:
                row["fits"] &= tried["shared"] <= TARGETS[case["arch"]]["shared"]
                row["shared"] = max(row["shared"], tried["shared"])
                row["registers"] = max(row["registers"], tried["registers"] or 0)
                row["spills"] = max(row["spills"], _spill(tried))
                if auto[launch["pass"]] == case["design"]:
                    row["spills_auto"] = max(row["spills_auto"], _spill(tried))
                loops = main_loops(launch["kernel"], launch["switches"], tried["mma_loops"])
                row["waits"] = max(row["waits"], max((w for _, w in loops), default=0))
                if launch["kernel"] in GEMMS:
                    row["wgmma"] &= tried["wgmma"] > 0
                    if case["arch"] == 100 and _fma_fused_wide(case) and not tried.get("tcgen05"):
                        row["fused_mma_sync"] = True
                    else:
                        row["tcgen05"] &= tried.get("tcgen05", 0) > 0
                    row["mma"] &= tried["mma"] > 0
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def markdown(cases: list[dict], probes: dict, meta: dict, fallbacks: list[dict]) -> str:
    by = summary_rows(cases)
    lines = [
        f"Compiled offline with Triton {meta['triton']} (`python -m bench.compile_check`, {meta['date']}, "
        f"{meta['compiles']} distinct compiles, {meta['compile_seconds'] / 60:.0f} minutes of one CPU core). Per "
        "dtype and rank, over every kernel each design launches (forward and backward, dropout 0 and 0.1, fused, "
        "split and hybrid) and every tile of its table: whether all fit (no launch falls back), the largest shared "
        "memory and register count, the largest spill (stores + loads, bytes) and, in parentheses, among the "
        "launches `auto` makes; wgmma use by the 16-bit GEMMs and the most wgmma waits in one iteration of any main "
        "loop on sm_90. `a+fp32`: activations and weights in a, LoRA weights in fp32 without autocast (rank-R "
        "products in fp32 at torch's fp32 precision, \"ieee\" by default, as PEFT's), `-autocast`: under bf16 "
        "autocast (the LoRA branch in bf16, as PEFT's under autocast).",
        "",
        "| dtype | R | sm_90 fits | shared KB | regs | spill (auto) | wgmma | waits / iter | sm_80 fits | shared KB "
        "| spill (auto) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in (*PLAIN, *MIXED):
        for R in RANKS:
            a, b = by.get((dtype, R, 90)), by.get((dtype, R, 80))
            if a is None or b is None:
                continue
            wg = _yes(a["wgmma"]) if dtype in DTYPES and DTYPES[dtype][0].itemsize == 2 else "–"
            lines.append(
                f"| {dtype} | {R} | {_yes(a['fits'])} | {a['shared'] / 1024:.0f} | {a['registers']} "
                f"| {a['spills']} ({a['spills_auto']}) | {wg} | {a['waits']} | {_yes(b['fits'])} "
                f"| {b['shared'] / 1024:.0f} | {b['spills']} ({b['spills_auto']}) |"
            )
    lines += [
        "",
        "Other targets (their own tile tables, `kernels/tiles.py`):",
        "",
        "| target | dtype | R | fits | shared KB | regs | spill (auto) | 16-bit GEMM MMA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in TARGETS:
        if arch in MAIN_TARGETS:
            continue
        for (dtype, R, a), row in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if a != arch:
                continue
            kind = {100: ("tcgen05", row["tcgen05"])}.get(arch, ("mma.sync", row["mma"]))
            mma = f"{kind[0]} {_yes(kind[1])}" if DTYPES[dtype][0].itemsize == 2 else "–"
            if row["fused_mma_sync"]:
                mma += " (fused: mma.sync, 16 warps)"
            lines.append(
                f"| {TARGETS[arch]['name']} | {dtype} | {R} | {_yes(row['fits'])} | {row['shared'] / 1024:.0f} "
                f"| {row['registers']} | {row['spills']} ({row['spills_auto']}) | {mma} |"
            )
    worst = max((launch["tried"][-1]["shared"] for case in fallbacks for launch in case["launches"]), default=0)
    lines += [
        "",
        f"Fallbacks (each list's last candidate alone, fp32 at R = 256, both designs, sm_80): the largest needs "
        f"{worst / 1024:.0f} KB of shared memory, within the {FALLBACK_SHARED // 1024} KB of the smallest GPUs "
        "(sm_86/89/120).",
        "",
        "SASS instructions per dropout-mask element (probe, 64×64 tile, 4 warps):",
        "",
        "| target | `_keep_mask` (8 lanes per Philox call) | `tl.rand` per element (first design) "
        "| stored mask, not built: packing it beside the draw | reading it back |",
        "|---|---|---|---|---|",
    ]
    for arch, probe in probes.items():
        cells = [probe[k] for k in ("keep_mask", "tl.rand", "pack_bits", "read_bits")]
        lines.append(f"| sm_{arch} | {' | '.join(str(c) for c in cells)} |")
    lines += ["", "Mask instructions per element of x, forward + backward, 768→2304, R = 16, p = 0.1:", ""]
    lines += ["| target | now | first design | ratio |", "|---|---|---|---|"]
    for arch, probe in probes.items():
        now, before = rng_per_element(probe, True), rng_per_element(probe, False)
        lines.append(f"| sm_{arch} | {now} | {before} | {before / now:.0f}× fewer |")
    return "\n".join(lines) + "\n"


def _replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{DOCS}: markers {begin} … {end} not found")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + end + rest.split(end, 1)[1]


def write_docs(table: str) -> None:
    """Refresh the generated blocks of docs/KERNELS.md: the compile table, the estimate, target, stored-mask and wave
    tables."""
    text = _replace_block(DOCS.read_text(), "compile-table", table)
    text = _replace_block(text, "estimate", designs.estimate_markdown())
    text = _replace_block(text, "targets", designs.targets_markdown())
    text = _replace_block(text, "stored-mask", designs.stored_mask_markdown())
    text = _replace_block(text, "waves", designs.waves_markdown())
    DOCS.write_text(text)
