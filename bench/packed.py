"""The packed-base comparison of ``bench/run.py --keep-quantized``: each row of ``model_step.PACKED_ROWS`` runs twice
on the same GGUF file, float (transformers' dequantised model) and packed (``lora_fast.gguf``), and these targets
compare ``lora_fast+packed`` with ``lora_fast``: weight bytes in memory, peak memory of the timed steps, step time."""

from __future__ import annotations

from bench.common import markdown_table

__all__ = ["PACKED_TARGETS", "check_packed_targets", "packed_table"]

# (name, measured, limit): lora_fast+packed / lora_fast at or below the limit.
PACKED_TARGETS = [
    ("weight bytes", "weight_mb", 0.25),
    ("peak memory", "peak_mem_mb", 0.7),
    ("step time", "s_per_step", 1.2),
]


def check_packed_targets(rows: list[dict]) -> list[dict]:
    """The verdicts of ``PACKED_TARGETS`` where both rows ran."""
    by = {r["name"]: r for r in rows}
    packed, dense = by.get("lora_fast+packed"), by.get("lora_fast")
    if packed is None or dense is None:
        return []
    return [
        {"target": f"lora_fast+packed {name} vs lora_fast <= {limit}", "ratio": packed[key] / dense[key],
         "limit": limit, "met": packed[key] / dense[key] <= limit}
        for name, key, limit in PACKED_TARGETS
    ]  # fmt: skip


def packed_table(rows: list[dict]) -> str:
    """Each row's weights in memory beside its step time and peak memory, and the packed/float ratios."""
    by = {r["name"]: r for r in rows}
    table = []
    for r in rows:
        dense = by.get(r["name"].removesuffix("+packed")) if r["name"].endswith("+packed") else None
        cells = [r["name"]]
        for key, fmt in (("weight_mb", ".0f"), ("s_per_step", ".3f"), ("peak_mem_mb", ".0f")):
            cells += [format(r[key], fmt), f"{r[key] / dense[key]:.2f}×" if dense else "–"]
        table.append(cells)
    header = ["row", "weights MiB", "vs float", "s/step", "vs float", "peak MiB", "vs float"]
    return markdown_table(header, table)
