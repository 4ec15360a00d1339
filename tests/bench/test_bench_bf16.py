"""The bf16 benchmarks' tools: ``python -m bench.compare`` (two results of bench/run.py, fp32 and bf16, side by side
with their ratios and the bf16 targets; runs of another device, model or batch, and a file of the wrong dtype, are
refused) and ``python -m bench.cpu_matmul`` (fp32 against bf16 GEMMs on this CPU)."""

import json

import pytest

from bench import cpu_matmul
from bench.compare import compare, main


def _result(dtype, times, date, batch=8, device="AMD EPYC, 2 threads"):
    config = {"model": None, "batch": batch, "seq": 128, "r": 16, "alpha": 32.0, "lora_dropout": 0.05, "device": "cpu"}
    rows = [{"name": n, "s_per_step": t, "peak_mem_mb": 1000.0 + t, "config": config} for n, t in times.items()]
    bf16 = {"native": True, "reason": "this CPU has avx512_bf16", "isa": "AVX512", "amx_tile": False,
            "avx512_bf16": True}  # fmt: skip
    precision = {"dtype": dtype, "reason": f"--dtype {dtype}", "bf16": bf16}
    return {"device": device, "date": date, "precision": precision, "model_step": rows}


FP32 = {"peft": 4.0, "lora_fast": 2.5, "floor": 2.4}
BF16 = {"peft": 2.0, "lora_fast": 0.9, "floor": 0.8}


def test_rows_side_by_side_with_ratios_and_targets():
    text = compare(
        _result("fp32", FP32, "2026-12-06T10:00:00+00:00"), _result("bf16", BF16, "2026-12-06T10:20:00+00:00")
    )
    rows = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ") for ln in text.splitlines() if ln.startswith("| ")}
    for name in FP32:
        assert rows[name][1:4] == [f"{FP32[name]:.3f}", f"{BF16[name]:.3f}", f"{BF16[name] / FP32[name]:.2f}×"]
    assert "(+20 min)" in text and "this CPU has avx512_bf16" in text
    own, vs_peft = BF16["lora_fast"] / FP32["lora_fast"], BF16["lora_fast"] / BF16["peft"]
    assert f"lora_fast bf16 step vs its fp32 step <= 0.4: MET ({own:.2f})" in text
    assert f"lora_fast bf16 step vs peft's bf16 step <= 0.5: MET ({vs_peft:.2f})" in text


@pytest.mark.parametrize("change", [{"batch": 4}, {"device": "another CPU"}])
def test_runs_that_differ_are_refused(change):
    with pytest.raises(SystemExit, match="differ in (batch|device)"):
        compare(_result("fp32", FP32, "2026-12-06T10:00:00"), _result("bf16", BF16, "2026-12-06T10:20:00", **change))


def test_a_file_of_the_wrong_dtype_is_refused(tmp_path):
    for dtype in ("fp32", "bf16"):
        (tmp_path / f"{dtype}.json").write_text(json.dumps(_result(dtype, FP32, "2026-12-06T10:00:00")))
    with pytest.raises(SystemExit, match="bf16.json ran in bf16, expected a --dtype fp32 run"):
        main([str(tmp_path / "bf16.json"), str(tmp_path / "fp32.json")])
    assert "| lora_fast |" in main([str(tmp_path / "fp32.json"), str(tmp_path / "bf16.json")])


def test_cpu_matmul_times_each_product_in_both_dtypes(capsys):
    rows = cpu_matmul.main(["--m", "8", "--k", "16", "--n", "24", "--seconds", "0.04"])
    assert [r["product"].split(" (")[0] for r in rows] == ["x Wᵀ", "g W", "gᵀ x"]
    assert all(r["fp32_ms"] > 0 and r["bf16_ms"] > 0 for r in rows)
    assert "M=8, K=16, N=24" in capsys.readouterr().out
