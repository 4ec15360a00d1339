"""The cost model's calibration: :func:`kernels.cost.fit` recovers the efficiency figures that timed the launches,
a calibration record round-trips and a bad one is refused by name, and the target table's what-if columns."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from lora_fast.kernels import cost, designs
from tests.helpers import ROOT

SHAPES = [(768, 2304, 16, 0.0), (768, 2304, 16, 0.1), (3072, 768, 16, 0.0), (4096, 4096, 16, 0.1)]


def _timed(machine: cost.Machine, M: int = 8192) -> list[tuple[cost.Launch, float]]:
    """Every launch of the floor and of each design's plans at ``SHAPES``, timed by ``machine``'s figures."""
    pairs = []
    for K, N, R, p in SHAPES:
        s = cost.Shape(M, N, K, R, p)
        plans = [*cost.floor_plan(s).values()]
        plans += [plan(s, d, machine) for d in designs.DESIGNS for plan in (cost.forward_plan, cost.backward_plan)]
        pairs += [(la, la.seconds(machine)) for plan in plans for la in plan]
    return pairs


def test_fit_recovers_the_figures_that_timed_the_launches():
    """Launches timed by a GPU slower than the data sheet's assumptions (cuBLAS at 0.55 of peak, Triton's loop at
    0.72 of cuBLAS, 2.6 TB/s) give back those three figures, whatever the machine the fit starts from."""
    truth = dataclasses.replace(cost.H100, cublas=0.55, triton=0.72, hbm=2.6e12)
    pairs = _timed(truth)
    figures = cost.fit(pairs, cost.H100)
    assert figures["cublas"] == pytest.approx(0.55, rel=1e-9)
    assert figures["hbm"] == pytest.approx(2.6e12, rel=1e-9)
    assert figures["triton"] == pytest.approx(0.72, rel=1e-9)
    assert min(figures["samples"].values()) > 0
    # The calibrated machine predicts the timings it was fitted to.
    machine = cost.calibrated(cost.H100, figures, "NVIDIA H100 80GB HBM3")
    assert all(la.seconds(machine) == pytest.approx(t, rel=1e-9) for la, t in pairs)
    assert machine.name == "NVIDIA H100 80GB HBM3 (calibrated)"


def test_every_triton_launch_of_a_plan_names_its_kernel():
    """A device run pairs timings with the plans by kernel name: every Triton launch of every plan (any rank,
    dropout, dtype) has one, and the torch op the fused backward adds at a rank not a multiple of 16 is not Triton."""
    names = set()
    for R in (8, 16, 128):
        for p in (0.0, 0.1):
            for dtype, lora in ((torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float32, None)):
                s = cost.Shape(4096, 2304, 768, R, p, dtype, lora, "ieee")
                for d in designs.DESIGNS:
                    for plan in (cost.forward_plan(s, d), cost.backward_plan(s, d)):
                        names |= {la.kernel for la in plan if la.impl in ("triton", "memory")}
                        assert all(la.impl in ("triton", "memory", "cublas", "torch") for la in plan)
    assert names == set(cost.TRITON_KERNELS), names ^ set(cost.TRITON_KERNELS)
    padded = cost.backward_plan(cost.Shape(4096, 2304, 768, 8), "fused")
    assert [la.impl for la in padded][0] == "torch"
    assert all(la.impl != "torch" for la in cost.backward_plan(cost.Shape(4096, 2304, 768, 16), "fused"))


def test_fit_keeps_what_no_launch_shows():
    """Without cuBLAS launches or memory passes the figures stay the machine's, and say so in their samples; a
    launch too short to show a rate (within 1.5 launch gaps) is left out."""
    only_triton = [(la, t) for la, t in _timed(cost.H100) if la.impl == "triton"]
    figures = cost.fit(only_triton, cost.H100)
    assert figures["cublas"] == cost.H100.cublas and figures["hbm"] == cost.H100.hbm
    assert figures["samples"]["cublas"] == figures["samples"]["hbm"] == 0 and figures["samples"]["triton"] > 0
    assert figures["triton"] == pytest.approx(cost.H100.triton, rel=1e-9)
    tiny = [(la, 1.2 * cost.H100.launch) for la, _ in only_triton]
    assert cost.fit(tiny, cost.H100)["samples"]["triton"] == 0


def test_calibration_record_round_trips_and_bad_ones_are_refused():
    figures = dict(cublas=0.61, triton=0.83, hbm=3.0e12, samples=dict(cublas=14, triton=20, hbm=30))
    machine = cost.base_machine((9, 0), 114)  # an H100 PCIe: the H100's data sheet, its own SM count
    record = json.loads(json.dumps(cost.calibration_record(machine, figures, "NVIDIA H100 PCIe")))
    back = cost.machine_from_record(record, "designs.json")
    assert (back.cublas, back.triton, back.hbm, back.sms, back.capability) == (0.61, 0.83, 3.0e12, 114, (9, 0))
    assert back.mma == cost.H100.mma and back.name == "NVIDIA H100 PCIe (calibrated)"
    assert cost.base_machine((8, 0), 108).mma == cost.A100.mma
    for change, message in (
        (dict(triton=-0.5), r"finite and > 0"),
        (dict(hbm=math.inf), r"finite and > 0"),
        (dict(base="B200"), r"base machine 'B200' is none of"),
        (dict(capability=[9]), r"not a GPU's"),
    ):
        with pytest.raises(ValueError, match=r"designs.json: not a calibration of bench/kernel_timing.py .*" + message):
            cost.machine_from_record(dict(record, **change), "designs.json")
    with pytest.raises(ValueError, match=r"designs.json: not a calibration .*'cublas'"):
        cost.machine_from_record({k: v for k, v in record.items() if k != "cublas"}, "designs.json")


def test_design_table_calibration_prices_the_shapes_it_does_not_hold(tmp_path, monkeypatch):
    """A device run's table carries its calibration: ``auto`` takes the table's row where it has one and the
    calibrated model elsewhere (here a GPU whose Triton loop runs at 0.3 of cuBLAS: the cuBLAS-based design wins);
    a broken calibration is refused naming the file."""
    gpu = "NVIDIA H100 80GB HBM3"
    slow = cost.calibration_record(
        cost.H100, dict(cublas=0.7, triton=0.3, hbm=3.35e12, samples=dict(cublas=1, triton=1, hbm=1)), gpu
    )
    row = dict(K=768, N=2304, R=16, p=0.0, dtype="bf16", M=8192, forward="split", backward="split")
    path = tmp_path / "designs.json"
    path.write_text(json.dumps({"device": gpu, "rows": [row], "calibration": slow}))
    monkeypatch.setenv(designs.TABLE_ENV, str(path))
    bf16 = (torch.bfloat16, "tf32")
    shape = (8192, 768, 3072, 16, 0.0)  # 3072→768: not in the table
    assert designs.backward_design("auto", *shape, *bf16) == "fused"  # no device given: the data sheet's model
    assert designs.backward_design("auto", *shape, *bf16, device=gpu) == "hybrid"
    assert designs.backward_design("auto", 8192, 2304, 768, 16, 0.0, *bf16, device=gpu) == "split"  # the row
    path.write_text(json.dumps({"device": gpu, "rows": [row], "calibration": dict(slow, triton=0)}))
    with pytest.raises(ValueError, match=r"LORA_FAST_DESIGNS=.*designs.json: not a calibration .*finite and > 0"):
        designs.backward_design("auto", *shape, *bf16, device=gpu)


def test_target_table_columns_only_ever_help():
    """Each what-if column removes a cost (Triton's loop below cuBLAS's, the last wave, the mask), so no ratio rises
    from one column to the next; the table has a row per target."""
    at_cublas = dataclasses.replace(cost.H100, triton=1.0)
    full = dataclasses.replace(at_cublas, full_waves=True)
    free = dataclasses.replace(full, int_rate=math.inf)
    for K, N, p in designs.TARGETS:
        s = cost.Shape(8192, N, K, 16, p)
        ratios = [designs.auto_ratio(s, m) for m in (cost.H100, at_cublas, full, free)]
        assert ratios == sorted(ratios, reverse=True), (K, N, p, ratios)
    text = designs.targets_markdown()
    assert text.count("\n| ") == 1 + len(designs.TARGETS) and "Triton loop 0.88 of cuBLAS" in text


@pytest.mark.parametrize("K, N", [(768, 2304), (3072, 768)])
@pytest.mark.parametrize("design", designs.DESIGNS)
def test_stored_mask_prices_bits_in_place_of_the_backward_draws(design, K, N):
    """The stored-mask design (priced, not run): the forward's pass over x still draws the mask and also packs it
    (bit_writes, M·⌈K/8⌉ bytes more); every backward pass that drew it reads it back instead (bit_reads, those bytes
    more), and no other launch changes; without dropout nothing changes."""
    drawn = cost.Shape(8192, N, K, 16, 0.1)
    stored = dataclasses.replace(drawn, stored_mask=True)
    assert stored.mask_bytes == 8192 * K // 8 and drawn.mask_bytes == 0
    for plan in (cost.forward_plan, cost.backward_plan):
        before, after = plan(drawn, design), plan(stored, design)
        assert [la.kernel for la in before] == [la.kernel for la in after]
        for la, lb in zip(before, after, strict=True):
            if not la.draws:
                assert lb == la
            elif plan is cost.forward_plan:
                assert (lb.draws, lb.bit_writes, lb.bit_reads) == (la.draws, la.draws, 0)
                assert lb.bytes - la.bytes == stored.mask_bytes
            else:
                assert (lb.draws, lb.bit_writes, lb.bit_reads) == (0, 0, la.draws)
                assert lb.bytes - la.bytes == stored.mask_bytes
    plain = cost.Shape(8192, N, K, 16, 0.0)
    flagged = dataclasses.replace(plain, stored_mask=True)
    for plan in (cost.forward_plan, cost.backward_plan):
        assert plan(plain, design) == plan(flagged, design)


def test_cli_prints_a_design_tables_calibration(tmp_path):
    """``python -m lora_fast.kernels --table designs.json`` prints the estimate on the calibrated machine; a table
    without a calibration is refused with a usage error."""
    record = cost.calibration_record(
        cost.H100, dict(cublas=0.6, triton=0.8, hbm=3e12, samples=dict(cublas=2, triton=3, hbm=4)), "GPU X"
    )
    path = tmp_path / "designs.json"
    path.write_text(json.dumps({"device": "GPU X", "rows": [], "calibration": record}))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lora_fast.kernels", *a], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    proc = run("--table", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("cublas = 0.6, triton = 0.8, hbm = 3e+12 (GPU X (calibrated))")
    assert "GPU X (calibrated), bf16, M = 8192" in proc.stdout and "Triton loop 0.80 of cuBLAS" in proc.stdout
    path.write_text(json.dumps({"device": "GPU X", "rows": []}))
    proc = run("--table", str(path))
    assert proc.returncode == 2 and "holds no calibration" in proc.stderr


def test_docs_quote_the_tables_the_model_prints_today():
    """docs/KERNELS.md's estimate and target blocks are what ``python -m lora_fast.kernels`` prints now (refreshed by
    ``python -m bench.compile_check --write-docs``), so a change to the model cannot leave old numbers there."""
    text = (ROOT / "docs" / "KERNELS.md").read_text()
    blocks = [("estimate", designs.estimate_markdown()), ("targets", designs.targets_markdown())]
    blocks.append(("stored-mask", designs.stored_mask_markdown()))
    for name, body in blocks:
        assert f"<!-- {name}:begin -->\n{body}<!-- {name}:end -->" in text, name
