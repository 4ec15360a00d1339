"""The offline compile tier (bench/compile_check.py) in CI: the committed full results
(``bench/results/compile_tier.json``: every dtype × rank × dropout × design on sm_90 and sm_80, and a reduced grid on
sm_86, sm_89, sm_100 and sm_120, hours of one core) must cover every case, pass the tier's checks and come from
today's kernels; a few cases are compiled live and must match them; the dropout-mask probe must cost what the cost
model assumes. ``--verify`` runs in its own process: the test session's interpreter switch would turn the kernels
into interpreted functions, which cannot be compiled for a GPU. The schedule test reads the committed results.
"""

import json

from tests.helpers import ROOT, run_compile_tier

RESULTS = ROOT / "bench" / "results" / "compile_tier.json"


def test_compile_tier_verifies():
    proc = run_compile_tier("bench.compile_check", "--verify")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile tier verified" in proc.stdout


def test_bf16_fp16_main_loops_keep_their_wgmmas_in_flight():
    """Every compiled configuration records its MMA loops and wgmma waits per iteration (from the SASS); on sm_90
    every main loop (over the reduction dimension, bench.compile_report.main_loops) of every bf16/fp16 kernel (and
    bf16 autocast over fp32 LoRA weights), bias frozen as LoRA trains, at R = 4 … 128, and with a trainable bias at
    every rank compiled (4 … 64), waits at most once per iteration, and the fused dx's loop issues its 16 HGMMAs
    (g W, u = g B, the dB product) with that one wait (it waited after each before it was branch-free, twice at R = 4
    and 8 and under autocast before B was read in whole rows of its compute dtype, and twice with a trainable bias at
    R = 32 and 64 while its column sums were a second product)."""
    from bench.compile_report import WAITS, main_loops

    data = json.loads(RESULTS.read_text())
    assert all("wgmma_waits_per_iter" in stats and "mma_loops" in stats for stats in data["cache"].values())
    loops, fused_dx, checked = 0, [], set()
    for case in data["cases"]:
        if case["arch"] != 90 or case["R"] not in WAITS.get(case["dtype"], ()):
            continue
        checked.add((case["dtype"], case["R"]))
        for launch in case["launches"]:
            for tried in launch["tried"]:
                for mma, waits in main_loops(launch["kernel"], launch["switches"], tried["mma_loops"]):
                    assert waits <= 1, (case["dtype"], case["R"], case["design"], launch["kernel"], tried["config"])
                    loops += 1
                    if launch["kernel"] == "_lora_dx_kernel" and launch["switches"]["FUSE_U"] == "True":
                        fused_dx.append([mma, waits])
    assert loops > 100  # the check saw the loops (not an empty file)
    assert {("bf16-dbias", 64), ("bf16", 128), ("fp16", 4), ("bf16+fp32-autocast", 64)} <= checked
    assert [16, 1] in fused_dx
