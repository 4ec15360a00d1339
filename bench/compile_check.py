"""The offline compile tier: every kernel, as the launchers call it, compiled for an H100 (sm_90) and an A100 (sm_80)
on a machine without a GPU, with Triton's bundled ptxas.

    python -m bench.compile_check                       # all cases, both targets (~1 h of one CPU core)
    python -m bench.compile_check --subset ci           # the few cases CI compiles live
    python -m bench.compile_check --write-docs          # also refresh the table in docs/KERNELS.md

Cases: dtype (fp32-tf32, fp32-ieee, fp16, bf16) × R (4 … 256) × dropout (0, 0.1) × design (fused, split) × pass
(forward, backward with dx, dA, dB and dbias) at M = 8192, 768 → 2304. Each case runs the real launcher
(:func:`lora_fast.kernels.lora_forward` / ``lora_backward``) on ``meta`` tensors inside
:func:`lora_fast.kernels.configs.capture_launches`: every launch hands over its kernel, its arguments and its ordered
candidate configurations, and this module compiles the candidates in order, exactly as the runtime pruner tries
them, until one needs no more shared memory than the target allows (227 KB sm_90, 163 KB sm_80): that is the
configuration the dispatcher chooses there. Signatures come from the arguments through Triton's own specialisation
rules (types, divisibility by 16, integers equal to 1); nothing is restated by hand.

Recorded per compile: shared memory, registers, spill bytes and stack frame (ptxas ``-v``), SASS instruction count,
wgmma (``HGMMA``) and mma.sync (``HMMA``) instructions. Besides, a probe kernel measures the SASS instructions per
dropout-mask element of ``_keep_mask`` and of one ``tl.rand`` per element (the previous design's draw).

Checked (exit status 1 on failure): every case has a configuration that fits; no chosen configuration spills for
R ≤ 64; every bf16/fp16 GEMM on sm_90 issues wgmma; the mask's instructions per element of x, forward plus backward,
are at most a quarter of the previous design's. Results: ``bench/results/compile_tier.json`` (full) and a markdown
table; a compile is reused from that file while its kernel's source (Triton's hash) and Triton are unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, whatever the caller's environment
# A private, empty Triton cache: ptxas must run for every compile, since its log is where spills are reported.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_check_")
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_fast.kernels import configs, cost  # noqa: E402
from lora_fast.kernels.dropout import _keep_mask  # noqa: E402
from lora_fast.kernels.lora_backward import lora_backward  # noqa: E402
from lora_fast.kernels.lora_forward import lora_forward  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compile_tier.json"
TABLE = ROOT / "bench" / "results" / "compile_tier.md"
DOCS = ROOT / "docs" / "KERNELS.md"
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), and SM counts.
TARGETS = {90: dict(name="sm_90 (H100)", shared=232448, sms=132), 80: dict(name="sm_80 (A100)", shared=166912, sms=108)}
DTYPES = {
    "fp32-tf32": (torch.float32, "tf32"),
    "fp32-ieee": (torch.float32, "ieee"),
    "fp16": (torch.float16, "tf32"),
    "bf16": (torch.bfloat16, "tf32"),
}
RANKS = (4, 8, 16, 32, 64, 128, 256)
# The fallback tiles must fit the smallest per-block shared memory of the GPUs Triton supports (sm_86/sm_89: 99 KB).
FALLBACK_SHARED = 101376
M, K, N = 8192, 768, 2304
CI_SUBSET = [("bf16", 16), ("fp32-ieee", 256)]


def kernel_key(fn) -> str:
    """Triton's hash of a kernel's source and of every jit function and global it uses: a compile result is reused
    (here and by the CI test) only while this and Triton's version are unchanged."""
    return f"{fn.cache_key[:16]}-triton{triton.__version__}"


# ---------------------------------------------------------------- one compile


def _signature(fn, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT would build them for these arguments."""
    sig, consts, attrs = {}, {}, {}
    params = {p.name: p for p in fn.params}
    names = fn.arg_names
    if len(args) + len(constexprs) != len(names):
        raise TypeError(f"{fn.__name__}: {len(args)} arguments + {sorted(constexprs)} do not match {names}")
    for i, (name, value) in enumerate(zip(names, args, strict=False)):
        specialize = not params[name].do_not_specialize
        ty, spec = native_specialize_impl(CUDABackend, value, False, specialize, specialize)
        if ty == "constexpr":
            sig[name], consts[(i,)] = "constexpr", value
        else:
            sig[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in constexprs.items():
        i = names.index(name)
        sig[name], consts[(i,)] = "constexpr", value
    return sig, consts, attrs


def _ptxas_stats(log: str) -> dict:
    out = {}
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("stack", r"(\d+) bytes stack frame"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
    ):
        m = re.search(pattern, log)
        out[key] = int(m.group(1)) if m else None
    return out


def _sass(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and not m.group(1).startswith("NOP"):
            ops.append(m.group(1))
    return ops


def compile_one(fn, args: tuple, constexprs: dict, config, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` with these launch arguments and read its resources back."""
    sig, consts, attrs = _signature(fn, args, {**constexprs, **dict(config.meta)})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    start = time.time()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
    finally:
        knobs.nvidia.dump_ptxas_log = False
    ops = _sass(compiled.asm["cubin"])
    return dict(
        shared=compiled.metadata.shared,
        **_ptxas_stats(log.getvalue()),
        sass=len(ops),
        wgmma=sum(op.startswith("HGMMA") for op in ops),
        mma=sum(op.startswith("HMMA") for op in ops),
        seconds=round(time.time() - start, 2),
    )


# ---------------------------------------------------------------- cases through the launchers


def _describe(value) -> str:
    if isinstance(value, tl.dtype):
        return str(value)
    return repr(value)


class Recorder:
    """The launch hook: compiles candidates in the runtime pruner's order, keeps every result (and a cache)."""

    def __init__(self, arch: int, cache: dict, fallback: bool = False):
        self.arch = arch
        self.limit = FALLBACK_SHARED if fallback else TARGETS[arch]["shared"]
        self.cache = cache
        self.fallback = fallback  # compile each list's last candidate only
        self.launches: list[dict] = []
        self.used: set[str] = set()

    def __call__(self, kernel, grid, arguments, constexprs, candidates):
        tried = []
        chosen = None
        for config in candidates[-1:] if self.fallback else candidates:
            args = arguments(config)
            sig, _, attrs = _signature(kernel, args, {**constexprs, **dict(config.meta)})
            key = json.dumps(
                [
                    kernel.__name__,
                    kernel_key(kernel),
                    self.arch,
                    sig,
                    sorted(map(str, attrs)),
                    sorted((k, _describe(v)) for k, v in {**constexprs, **dict(config.meta)}.items()),
                    config.num_warps,
                    config.num_stages,
                ],
                sort_keys=True,
            )
            if key not in self.cache:
                self.cache[key] = compile_one(kernel, args, constexprs, config, self.arch)
            self.used.add(key)
            stats = self.cache[key]
            tried.append(dict(config=str(config), **stats))
            if stats["shared"] <= self.limit:
                chosen = config
                break
        self.launches.append(
            dict(
                kernel=kernel.__name__,
                source=kernel_key(kernel),
                switches={k: _describe(v) for k, v in constexprs.items() if k not in ("INTERPRET",)},
                tried=tried,
                chosen=str(chosen) if chosen else None,
            )
        )
        return chosen or candidates[-1]


def run_case(dtype_name: str, R: int, p: float, design: str, arch: int, cache: dict, fallback: bool = False) -> dict:
    """One (dtype, R, dropout, design) case, forward and backward, through the real launchers on meta tensors.
    ``fallback``: compile only the last candidate of each launch, against the smallest GPU's limit."""
    dtype, precision = DTYPES[dtype_name]
    recorder = Recorder(arch, cache, fallback)
    info = configs.DeviceInfo(TARGETS[arch]["sms"], (arch // 10, arch % 10))
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(M, K, **meta)
    weight = torch.empty(K, N, **meta).t()  # Conv1D layout, as GPT-2 stores it
    bias = torch.empty(N, **meta)
    A, B = torch.empty(R, K, **meta), torch.empty(N, R, **meta)
    g = torch.empty(M, N, **meta)
    key = torch.empty(2, device="meta", dtype=torch.int64)
    kw = dict(design=design, input_precision=precision)
    with configs.capture_launches(recorder, info):
        _, h = lora_forward(x, weight, bias, A, B, 2.0, p, key, **kw)
        n_forward = len(recorder.launches)
        lora_backward(g, x, weight, A, B, h, 2.0, p, key, need_dbias=True, bias_dtype=dtype, **kw)
    for i, launch in enumerate(recorder.launches):
        launch["pass"] = "forward" if i < n_forward else "backward"
    return dict(dtype=dtype_name, R=R, p=p, design=design, arch=arch, launches=recorder.launches, keys=recorder.used)


# ---------------------------------------------------------------- the dropout-mask probe


@triton.jit
def _probe_keep_mask(
    x_ptr, out_ptr, seed, threshold, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROP: tl.constexpr
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    if DROP:
        x = tl.where(_keep_mask(seed, offs_m, 0, K // 8, threshold, BLOCK_M, BLOCK_K), x, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], x)


@triton.jit
def _probe_rand(x_ptr, out_ptr, seed, p, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROP: tl.constexpr):
    """The previous design's draw: one ``tl.rand`` (one Philox call) per element, compared with p."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    if DROP:
        keep = tl.rand(seed, offs_m[:, None].to(tl.int64) * K + offs_k[None, :]) >= p
        x = tl.where(keep, x, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], x)


def probe_mask(arch: int, cache: dict, used: set | None = None) -> dict:
    """SASS instructions per mask element: (instructions with the mask − without) × threads / tile elements."""
    bm, bk, warps = 64, 64, 4
    x = torch.empty(M, K, device="meta", dtype=torch.bfloat16)
    out = {}
    for name, fn, scalar in (("keep_mask", _probe_keep_mask, 6554), ("tl.rand", _probe_rand, 0.1)):
        counts = {}
        for drop in (False, True):
            config = configs.cfg(BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=1)
            key = json.dumps(["probe", name, kernel_key(fn), arch, drop])
            if key not in cache:
                cache[key] = compile_one(fn, (x, x, 1234, scalar, K), {"DROP": drop}, config, arch)
            if used is not None:
                used.add(key)
            counts[drop] = cache[key]["sass"]
        out[name] = round((counts[True] - counts[False]) * warps * 32 / (bm * bk), 2)
    return out


# ---------------------------------------------------------------- checks and tables

GEMMS = ("_lora_forward_kernel", "_lora_dx_kernel")


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
        for launch in case["launches"]:
            chosen = launch["tried"][-1]
            if launch["chosen"] is None:
                failures.append(f"{tag} {launch['kernel']}: no configuration fits {TARGETS[case['arch']]['shared']} B")
                continue
            if case["R"] <= 64 and (chosen["spill_stores"] or chosen["spill_loads"]):
                failures.append(f"{tag} {launch['kernel']} {launch['chosen']}: spills {chosen['spill_stores']} B")
            if case["arch"] == 90 and case["dtype"] in ("bf16", "fp16") and launch["kernel"] in GEMMS:
                if not chosen["wgmma"]:
                    failures.append(f"{tag} {launch['kernel']} {launch['chosen']}: no wgmma on sm_90")
    for arch, probe in probes.items():
        now, before = rng_per_element(probe, new=True), rng_per_element(probe, new=False)
        if now > before / 4:
            failures.append(f"sm_{arch}: mask instructions per element {now} > 1/4 of {before}")
    return failures


def rng_per_element(probe: dict, new: bool, p: float = 0.1) -> float:
    """Mask instructions per element of x, forward + backward, at the headline shape (bf16, R = 16): draws per
    element of each pass (from the cost model's plans) × the probe's instructions per draw. The previous design drew
    once per N tile in the fused forward (BLOCK_N = 128), once in dx and once in dA, with ``tl.rand`` each time."""
    if not new:
        return round(probe["tl.rand"] * (triton.cdiv(N, 128) + 2), 1)
    draws = 0.0
    for plan in (cost.forward_plan, cost.backward_plan):
        design = (cost.forward_design if plan is cost.forward_plan else cost.backward_design)(
            "auto", M, N, K, 16, p, torch.bfloat16, "tf32"
        )
        draws += sum(launch.draws for launch in plan(M, N, K, 16, p, torch.bfloat16, "tf32", design == "fused"))
    return round(probe["keep_mask"] * draws / (M * K), 1)


def summary_rows(cases: list[dict]) -> list[dict]:
    """Per (dtype, R, arch): fits, worst shared memory / registers / spills over the chosen configs, wgmma."""
    rows = {}
    for case in cases:
        key = (case["dtype"], case["R"], case["arch"])
        row = rows.setdefault(key, dict(dtype=case["dtype"], R=case["R"], arch=case["arch"], fits=True, shared=0,
                                        registers=0, spills=0, spills_auto=0, wgmma=True))  # fmt: skip
        auto_design = {
            pass_: (cost.forward_design if pass_ == "forward" else cost.backward_design)(
                "auto", M, N, K, case["R"], case["p"], *DTYPES[case["dtype"]]
            )
            for pass_ in ("forward", "backward")
        }
        for launch in case["launches"]:
            chosen = launch["tried"][-1]
            row["fits"] &= launch["chosen"] is not None
            row["shared"] = max(row["shared"], chosen["shared"])
            row["registers"] = max(row["registers"], chosen["registers"] or 0)
            spill = (chosen["spill_stores"] or 0) + (chosen["spill_loads"] or 0)
            row["spills"] = max(row["spills"], spill)
            if auto_design[launch["pass"]] == case["design"]:
                row["spills_auto"] = max(row["spills_auto"], spill)
            if launch["kernel"] in GEMMS and case["dtype"] in ("bf16", "fp16") and case["arch"] == 90:
                row["wgmma"] &= chosen["wgmma"] > 0
    return list(rows.values())


def markdown(cases: list[dict], probes: dict, meta: dict, fallbacks: list[dict]) -> str:
    rows = summary_rows(cases)
    lines = [
        f"Compiled offline with Triton {meta['triton']} (`python -m bench.compile_check`, {meta['date']}, "
        f"{meta['compiles']} distinct compiles, {meta['compile_seconds'] / 60:.0f} minutes of one CPU core). Per "
        "dtype and rank, over every kernel each design launches (forward and backward, dropout 0 and 0.1, fused and "
        "split): whether the dispatcher finds a configuration that fits, the "
        "largest shared memory and register count among the chosen configurations, the largest spill (stores + "
        "loads, bytes) among them and among those the `auto` design actually launches, and wgmma use by the "
        "bf16/fp16 GEMMs on sm_90.",
        "",
        "| dtype | R | sm_90 fits | sm_90 shared KB | sm_90 regs | sm_90 spill (auto) | wgmma | sm_80 fits "
        "| sm_80 shared KB | sm_80 spill (auto) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["dtype"], r["R"], r["arch"]): r for r in rows}
    for dtype in DTYPES:
        for R in RANKS:
            a, b = by.get((dtype, R, 90)), by.get((dtype, R, 80))
            if a is None or b is None:
                continue
            wg = ("yes" if a["wgmma"] else "NO") if dtype in ("bf16", "fp16") else "–"
            lines.append(
                f"| {dtype} | {R} | {'yes' if a['fits'] else 'NO'} | {a['shared'] / 1024:.0f} | {a['registers']} "
                f"| {a['spills']} ({a['spills_auto']}) | {wg} | {'yes' if b['fits'] else 'NO'} "
                f"| {b['shared'] / 1024:.0f} | {b['spills']} ({b['spills_auto']}) |"
            )
    worst = max((launch["tried"][-1]["shared"] for case in fallbacks for launch in case["launches"]), default=0)
    lines += [
        "",
        f"Fallbacks (each list's last candidate alone, fp32 at R = 256, both designs, sm_80): the largest needs "
        f"{worst / 1024:.0f} KB of shared memory, within the 99 KB of the smallest GPUs Triton supports (sm_86/sm_89).",
    ]
    lines += ["", "SASS instructions per dropout-mask element (probe, 64×64 tile, 4 warps):", ""]
    lines += ["| target | `_keep_mask` (8 lanes per Philox call) | `tl.rand` per element (before) |", "|---|---|---|"]
    for arch, probe in probes.items():
        lines.append(f"| sm_{arch} | {probe['keep_mask']} | {probe['tl.rand']} |")
    lines += ["", "Mask instructions per element of x, forward + backward, 768→2304, R = 16, p = 0.1:", ""]
    lines += ["| target | now | before | ratio |", "|---|---|---|---|"]
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
    """Refresh the generated blocks of docs/KERNELS.md: the compile table and the cost model's estimate table."""
    text = _replace_block(DOCS.read_text(), "compile-table", table)
    text = _replace_block(text, "estimate", cost.estimate_markdown())
    DOCS.write_text(text)


# ---------------------------------------------------------------- verification (CI)


def jit_kernels() -> list:
    """Every kernel the launchers run."""
    import importlib

    mod = lambda name: importlib.import_module(f"lora_fast.kernels.{name}")  # noqa: E731
    return [
        mod("lora_forward")._lora_forward_kernel,
        mod("skinny")._lora_skinny_kernel,
        mod("lora_backward")._lora_dx_kernel,
        mod("partials")._lora_reduce_kernel,
        mod("partials")._lora_finalize_kernel,
        mod("dropout")._lora_dropout_mask_kernel,
    ]


def verify(log=print) -> list[str]:
    """What CI checks in about a minute: the committed full results cover every case, pass the checks and were made
    from today's kernels; the headline case compiled live matches them entry for entry; the largest operands fit
    sm_80; the mask probe agrees with the cost model. Returns the failures."""
    if not RESULTS.exists():
        return [f"{RESULTS} is missing: run python -m bench.compile_check --write-docs"]
    committed = json.loads(RESULTS.read_text())
    failures = []
    cases = committed["cases"]
    want = {(d, r, p, design, a) for d in DTYPES for r in RANKS for p in (0.0, 0.1) for design in ("fused", "split")
            for a in TARGETS}  # fmt: skip
    have = {(c["dtype"], c["R"], c["p"], c["design"], c["arch"]) for c in cases}
    if have != want:
        failures.append(f"committed results miss {len(want - have)} cases, e.g. {sorted(want - have)[:3]}")
    # The source part of each key: another Triton version alone does not make the results stale (the live compiles
    # below are compared with them only under the same version).
    source = lambda key: key.split("-triton")[0]  # noqa: E731
    current = {fn.__name__: source(kernel_key(fn)) for fn in jit_kernels()}
    stale = {
        launch["kernel"]
        for case in cases
        for launch in case["launches"]
        if source(launch["source"]) != current[launch["kernel"]]
    }
    if stale:
        failures.append(f"{sorted(stale)} changed since {RESULTS.name} was made: rerun python -m bench.compile_check")
    probes = {int(a): v for a, v in committed["probes"].items()}
    failures += [f"committed: {f}" for f in check(cases, probes, committed.get("fallbacks", []))]
    if not committed.get("fallbacks"):
        failures.append("committed results have no fallback cases: rerun python -m bench.compile_check")
    log(f"committed results: {len(cases)} cases, {committed['meta']['compiles']} compiles, checked")

    cache: dict = {}
    live = [run_case("bf16", 16, 0.1, design, 90, cache) for design in ("fused", "split")]
    live.append(run_case("fp32-ieee", 256, 0.1, "split", 80, cache))
    failures += [f"live: {f}" for f in check(live, {})]
    if committed["meta"]["triton"] == triton.__version__:
        for key, stats in cache.items():
            old = committed["cache"].get(key)
            if old is None:
                failures.append(f"live compile not in the committed results (rerun the tier): {key[:120]}")
                continue
            for field in ("shared", "registers", "spill_stores", "sass", "wgmma"):
                if stats[field] != old[field]:
                    failures.append(f"live {field} {stats[field]} != committed {old[field]}: {key[:120]}")
    probe = probe_mask(90, cache)
    if probe["keep_mask"] > 1.05 * cost.RNG_INSTR:
        failures.append(
            f"mask costs {probe['keep_mask']} instructions per element, the cost model assumes {cost.RNG_INSTR}"
        )
    if probe["keep_mask"] > probe["tl.rand"] / 4:
        failures.append(f"mask {probe['keep_mask']} > 1/4 of tl.rand's {probe['tl.rand']} per element")
    log(f"live: {len(cache)} compiles, mask probe {probe}")
    return failures


# ---------------------------------------------------------------- main


def run(subset: str | None, archs: tuple[int, ...], reuse: dict | None, log=print) -> dict:
    cache = dict(reuse or {})
    cases = []
    grid = [(d, r) for d in DTYPES for r in RANKS] if subset is None else CI_SUBSET
    start = time.time()
    for arch in archs:
        for dtype_name, R in grid:
            for p in (0.0, 0.1):
                for design in ("fused", "split"):
                    cases.append(run_case(dtype_name, R, p, design, arch, cache))
            log(f"sm_{arch} {dtype_name} R={R}: {len(cache)} compiles cached, {time.time() - start:.0f} s")
    # The largest operands (fp32, R = 256, dropout, both designs): each launch's fallback alone, for sm_80.
    fallbacks = [
        run_case(d, 256, 0.1, design, 80, cache, fallback=True)
        for d in ("fp32-ieee", "fp32-tf32")
        for design in ("fused", "split")
    ]
    used = set().union(*(case.pop("keys") for case in cases + fallbacks))
    probes = {arch: probe_mask(arch, cache, used) for arch in archs}
    cache = {key: cache[key] for key in cache if key in used}  # earlier kernel versions' compiles drop out
    meta = dict(
        triton=triton.__version__,
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        shape=dict(M=M, K=K, N=N),
        targets={str(a): TARGETS[a] for a in archs},
        compiles=len(cache),
        # What compiling everything costs on one core (each compile timed when it was made), and this run's time.
        compile_seconds=round(sum(stats["seconds"] for stats in cache.values())),
        seconds=round(time.time() - start),
    )
    return dict(meta=meta, probes={str(a): v for a, v in probes.items()}, cases=cases, fallbacks=fallbacks, cache=cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=["ci"], help="only the CI cases (bf16 R=16, fp32-ieee R=256)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(TARGETS))
    ap.add_argument(
        "--out", type=pathlib.Path, help=f"results JSON (default {RESULTS.relative_to(ROOT)} for a full run)"
    )
    ap.add_argument("--write-docs", action="store_true", help="refresh the compile table in docs/KERNELS.md")
    ap.add_argument("--verify", action="store_true", help="CI: check the committed results, compile a few live")
    args = ap.parse_args(argv)
    if args.verify:
        failures = verify()
        for f in failures:
            print("FAIL:", f, file=sys.stderr)
        print("compile tier verified" if not failures else f"{len(failures)} failures")
        return 1 if failures else 0
    out = args.out or (RESULTS if args.subset is None else None)
    reuse = json.loads(out.read_text()).get("cache") if out is not None and out.exists() else None
    result = run(args.subset, tuple(args.arch), reuse)
    probes = {int(a): v for a, v in result["probes"].items()}
    failures = check(result["cases"], probes, result["fallbacks"])
    result["meta"]["failures"] = failures
    table = markdown(result["cases"], probes, result["meta"], result["fallbacks"])
    print(table)
    if out is not None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=0, sort_keys=True))
        tmp.replace(out)
        if args.subset is None:
            TABLE.write_text(table)
    if args.write_docs:
        write_docs(table)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
