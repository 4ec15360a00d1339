"""The offline compile tier: every kernel, as the launchers call it, compiled on a machine without a GPU for each
target Triton's bundled ptxas knows: sm_80 (A100), sm_86 and sm_89 (RTX 30xx/40xx, A10, L4, L40), sm_90 (H100),
sm_100 (B200), sm_120 (RTX 50xx).

    python -m bench.compile_check                       # all cases, all targets (hours of one CPU core; cached)
    python -m bench.compile_check --subset ci           # the few cases CI compiles live
    python -m bench.compile_check --write-docs          # also refresh the tables in docs/KERNELS.md
    python -m bench.compile_check --verify              # CI: the committed results, and a few compiled live

Cases (M = 8192, 768 → 2304, forward and backward with dx, dA and dB, the bias frozen, dropout 0 and 0.1, designs
fused, split and hybrid), by dtype: fp32 (TF32 and "ieee"), fp16, bf16 at R 4 … 256; and the mixed cases, 16-bit
activations and weights with fp32 LoRA weights (no autocast, at torch's default fp32 precision "ieee" and at TF32:
PEFT's default set-up; and under bf16 autocast, where the LoRA branch computes in bf16), and bf16 with a trainable
bias (dbias too), at R 4 … 64, all on sm_90 and sm_80; on the other targets bf16, fp32 (both) and the mixed case at
R 16 and 64. Each case runs the real launchers on ``meta``
tensors inside :func:`lora_fast.kernels.configs.capture_launches`; every launch hands over its kernel, arguments and
ordered candidates, and this module compiles each candidate but the shared fallback (any of them may be the one the
wave count puts first at another shape), in order: the first that needs no more shared memory than the target allows
is the one the dispatcher chooses at this shape.

Recorded per compile (:mod:`bench.sass`): shared memory, registers, spills, SASS instructions, wgmma (sm_90),
tcgen05 (sm_100) and mma.sync instructions, and per main loop its MMAs and wgmma waits (``wgmma_waits_per_iter``).
Checked (exit status 1 on failure, :mod:`bench.compile_report`): every candidate of every table fits its target (so
no launch falls back there), none spills for R <= 64, the 16-bit GEMMs issue wgmma on sm_90 and tcgen05 on sm_100,
every main loop of the bf16/fp16 (and autocast) kernels on sm_90 waits at most once per iteration up to R = 128,
each list's fallback fits 99 KB with the largest operands, the mask's instructions per element are at most a quarter
of the previous design's. Probes also measure the instructions per element of a dropout mask stored one bit per
element (packing it beside the draw, and reading it back): the cost model prices that design with them.
Results: ``bench/results/compile_tier.json`` and a markdown table; a compile is reused from that file while its
kernel's source (Triton's hash) and Triton are unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
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

from bench.compile_cases import (  # noqa: E402
    CI_SUBSET,
    DESIGNS,
    DTYPES,
    FALLBACK_SHARED,
    MAIN_TARGETS,
    TARGETS,
    K,
    M,
    N,
    grid,
)
from bench.compile_report import check, markdown, write_docs  # noqa: E402
from bench.sass import compile_one, kernel_key, signature  # noqa: E402
from lora_fast.kernels import configs, cost  # noqa: E402
from lora_fast.kernels.dropout import _keep_mask  # noqa: E402
from lora_fast.kernels.lora_backward import launch_lora_backward  # noqa: E402
from lora_fast.kernels.lora_forward import launch_lora_forward  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compile_tier.json"
TABLE = ROOT / "bench" / "results" / "compile_tier.md"

# ---------------------------------------------------------------- cases through the launchers


def _describe(value) -> str:
    return str(value) if isinstance(value, tl.dtype) else repr(value)


class Recorder:
    """The launch hook: compiles a launch's candidates in the runtime pruner's order (every one but the fallback;
    ``fallback``: the fallback alone, against the smallest GPU's limit), keeps each result (and a cache)."""

    def __init__(self, arch: int, cache: dict, fallback: bool = False):
        self.arch = arch
        self.limit = FALLBACK_SHARED if fallback else TARGETS[arch]["shared"]
        self.cache = cache
        self.fallback = fallback
        self.launches: list[dict] = []
        self.used: set[str] = set()

    def compile(self, kernel, config, args, constexprs) -> dict:
        sig, _, attrs = signature(kernel, args, {**constexprs, **dict(config.meta)})
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
        return self.cache[key]

    def __call__(self, kernel, grid, arguments, constexprs, candidates):
        own = candidates[-1:] if self.fallback or len(candidates) == 1 else candidates[:-1]
        tried, chosen = [], None
        for config in own:
            stats = self.compile(kernel, config, arguments(config), constexprs)
            tried.append(dict(config=str(config), **stats))
            if chosen is None and stats["shared"] <= self.limit:
                chosen = config
        if chosen is None and not self.fallback and len(candidates) > 1:
            # None of the table's tiles fits: the pruner runs the fallback (and warns); it must fit.
            stats = self.compile(kernel, candidates[-1], arguments(candidates[-1]), constexprs)
            if stats["shared"] <= self.limit:
                chosen = candidates[-1]
        first = chosen or candidates[-1]
        arguments(first)  # the launcher's buffers sized for the configuration that runs
        self.launches.append(
            dict(
                kernel=kernel.__name__,
                source=kernel_key(kernel),
                switches={k: _describe(v) for k, v in constexprs.items() if k not in ("INTERPRET",)},
                tried=tried,
                chosen=str(chosen) if chosen else None,
            )
        )
        return first


def run_case(dtype_name: str, R: int, p: float, design: str, arch: int, cache: dict, fallback: bool = False) -> dict:
    """One (dtype, R, dropout, design) case, forward and backward, through the real launchers on meta tensors."""
    dtype, lora_dtype, lora_compute, precision = DTYPES[dtype_name]
    recorder = Recorder(arch, cache, fallback)
    info = configs.DeviceInfo(TARGETS[arch]["sms"], (arch // 10, arch % 10), TARGETS[arch]["name"])
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(M, K, **meta)
    weight = torch.empty(K, N, **meta).t()  # Conv1D layout, as GPT-2 stores it
    bias = torch.empty(N, **meta)
    A, B = torch.empty(R, K, device="meta", dtype=lora_dtype), torch.empty(N, R, device="meta", dtype=lora_dtype)
    g = torch.empty(M, N, **meta)
    key = torch.empty(2, device="meta", dtype=torch.int64)
    kw = dict(design=design, input_precision=precision, lora_dtype=lora_compute)
    with configs.capture_launches(recorder, info):
        _, h = launch_lora_forward(x, weight, bias, A, B, 2.0, p, key, **kw)
        n_forward = len(recorder.launches)
        need_dbias = dtype_name.endswith("-dbias")  # LoRA's norm: the bias frozen
        launch_lora_backward(g, x, weight, A, B, h, 2.0, p, key, need_dbias=need_dbias, bias_dtype=dtype, **kw)
    for i, launch in enumerate(recorder.launches):
        launch["pass"] = "forward" if i < n_forward else "backward"
    return dict(dtype=dtype_name, R=R, p=p, design=design, arch=arch, launches=recorder.launches, keys=recorder.used)


# ---------------------------------------------------------------- the dropout-mask probe


@triton.jit
def _probe_keep_mask(
    x_ptr, out_ptr, key_ptr, threshold, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROP: tl.constexpr
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    if DROP:
        x = tl.where(_keep_mask(key_ptr, offs_m, 0, K // 8, threshold, BLOCK_M, BLOCK_K), x, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], x)


@triton.jit
def _probe_stored_mask(
    x_ptr, out_ptr, bits_ptr, key_ptr, threshold, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr
):
    """The dropout mask stored one bit per element, a design the cost model prices but the kernels do not run: MODE 0
    loads and stores x; 1 draws the mask from Philox words as ``_keep_mask`` does and selects; 2 also packs it from
    the same words, bit j of byte c for column 8c + j, and stores the bytes (the forward's extra work: 2 - 1); 3 reads
    the bytes back, unpacks them and selects (the backward's: 3 - 0)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_K // 8)
    bit_ptrs = bits_ptr + offs_m[:, None] * (K // 8) + offs_g[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    if MODE == 1 or MODE == 2:
        c0 = (offs_m[:, None] * (K // 8) + offs_g[None, :]).to(tl.uint32)
        _0 = c0 * 0
        r0, r1, r2, r3 = tl.philox(tl.load(key_ptr), c0, _0, _0 + tl.load(key_ptr + 1).to(tl.uint32), _0)
        limit = threshold.to(tl.uint32) << 16
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K // 2))
        x = tl.where(tl.reshape(tl.join(words << 16, words), (BLOCK_M, BLOCK_K)) >= limit, x, 0.0)
        if MODE == 2:  # word w holds columns 2w (low 16 bits) and 2w + 1 (high)
            byte = ((r0 << 16) >= limit).to(tl.int32) | ((r0 >= limit).to(tl.int32) << 1)
            byte |= (((r1 << 16) >= limit).to(tl.int32) << 2) | ((r1 >= limit).to(tl.int32) << 3)
            byte |= (((r2 << 16) >= limit).to(tl.int32) << 4) | ((r2 >= limit).to(tl.int32) << 5)
            byte |= (((r3 << 16) >= limit).to(tl.int32) << 6) | ((r3 >= limit).to(tl.int32) << 7)
            tl.store(bit_ptrs, byte.to(tl.uint8))
    if MODE == 3:
        byte = tl.load(bit_ptrs, mask=(offs_m < M)[:, None], other=0).to(tl.int32)
        # three joins, each adding a trailing dim of 2: copy 4a + 2b + c of byte g lands in column 8g + 4a + 2b + c,
        # shifted right by 4a + 2b + c
        byte = tl.join(byte, byte >> 4)
        byte = tl.join(byte, byte >> 2)
        byte = tl.join(byte, byte >> 1)
        x = tl.where((tl.reshape(byte, (BLOCK_M, BLOCK_K)) & 1) != 0, x, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], x)


@triton.jit
def _probe_rand(x_ptr, out_ptr, seed, p, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROP: tl.constexpr):
    """The first design's draw: one ``tl.rand`` (one Philox call) per element, compared with p."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    if DROP:
        keep = tl.rand(seed, offs_m[:, None].to(tl.int64) * K + offs_k[None, :]) >= p
        x = tl.where(keep, x, 0.0)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], x)


def probe_mask(arch: int, cache: dict, used: set | None = None) -> dict:
    """SASS instructions per mask element: (instructions with the mask − without) × threads / tile elements; for the
    stored mask, of packing it beside the draw and of reading it back."""
    bm, bk, warps = 64, 64, 4
    config = configs.cfg(BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=1)
    x = torch.empty(M, K, device="meta", dtype=torch.bfloat16)
    key = torch.empty(2, device="meta", dtype=torch.int64)
    bits = torch.empty(M, K // 8, device="meta", dtype=torch.uint8)

    def sass(name: str, fn, args: tuple, switch: str, value) -> int:
        """SASS instructions of probe ``fn`` compiled with ``switch = value`` (cached, and marked used)."""
        cache_key = json.dumps(["probe", name, kernel_key(fn), arch, value])
        if cache_key not in cache:
            cache[cache_key] = compile_one(fn, args, {switch: value}, config, arch)
        if used is not None:
            used.add(cache_key)
        return cache[cache_key]["sass"]

    per_element = lambda more, fewer: round((more - fewer) * warps * 32 / (bm * bk), 2)  # noqa: E731
    out = {}
    for name, fn, first in (("keep_mask", _probe_keep_mask, (key, 6554)), ("tl.rand", _probe_rand, (1234, 0.1))):
        counts = [sass(name, fn, (x, x, *first, K), "DROP", drop) for drop in (False, True)]
        out[name] = per_element(counts[1], counts[0])
    # The stored mask: packing beside the draw (mode 2 - 1), and reading it back (3 - 0).
    counts = [sass("stored_mask", _probe_stored_mask, (x, x, bits, key, 6554, M, K), "MODE", m) for m in range(4)]
    out["pack_bits"] = per_element(counts[2], counts[1])
    out["read_bits"] = per_element(counts[3], counts[0])
    return out


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
        mod("hybrid")._lora_rank_out_kernel,
        mod("dropout")._lora_dropout_mask_kernel,
    ]


def verify(log=print) -> list[str]:
    """What CI checks in about a minute: the committed full results cover every case, pass the checks and were made
    from today's kernels; a few cases compiled live match them entry for entry; the mask probe agrees with the cost
    model. Returns the failures."""
    if not RESULTS.exists():
        return [f"{RESULTS} is missing: run python -m bench.compile_check --write-docs"]
    committed = json.loads(RESULTS.read_text())
    failures = []
    cases = committed["cases"]
    want = {(d, r, p, design, a) for d, r, a in grid() for p in (0.0, 0.1) for design in DESIGNS}
    have = {(c["dtype"], c["R"], c["p"], c["design"], c["arch"]) for c in cases}
    if have != want:
        failures.append(f"committed results miss {len(want - have)} cases, e.g. {sorted(want - have)[:3]}")
    # The source part of each key: another Triton version alone does not make the results stale (the live compiles
    # below are compared with them only under the same version).
    source = lambda key: key.split("-triton")[0]  # noqa: E731
    current = {fn.__name__: source(kernel_key(fn)) for fn in jit_kernels()}
    stale = {launch["kernel"] for case in cases for launch in case["launches"]
             if source(launch["source"]) != current[launch["kernel"]]}  # fmt: skip
    if stale:
        failures.append(f"{sorted(stale)} changed since {RESULTS.name} was made: rerun python -m bench.compile_check")
    probes = {int(a): v for a, v in committed["probes"].items()}
    failures += [f"committed: {f}" for f in check(cases, probes, committed.get("fallbacks", []))]
    if not committed.get("fallbacks"):
        failures.append("committed results have no fallback cases: rerun python -m bench.compile_check")
    log(f"committed results: {len(cases)} cases, {committed['meta']['compiles']} compiles, checked")

    cache: dict = {}
    live = [run_case("bf16", 16, 0.0, "fused", 90, cache), run_case("bf16", 16, 0.1, "split", 90, cache)]
    live.append(run_case("fp32-ieee", 256, 0.1, "split", 80, cache))
    failures += [f"live: {f}" for f in check(live, {})]
    if committed["meta"]["triton"] == triton.__version__:
        for key, stats in cache.items():
            old = committed["cache"].get(key)
            if old is None:
                failures.append(f"live compile not in the committed results (rerun the tier): {key[:120]}")
                continue
            for field in ("shared", "registers", "spill_stores", "sass", "wgmma", "wgmma_waits_per_iter"):
                if stats[field] != old[field]:
                    failures.append(f"live {field} {stats[field]} != committed {old[field]}: {key[:120]}")
    probe = probe_mask(90, cache)
    if probe["keep_mask"] > 1.05 * cost.RNG_INSTR:
        failures.append(
            f"mask costs {probe['keep_mask']} instructions per element, the cost model assumes {cost.RNG_INSTR}"
        )
    for name, model in (("pack_bits", cost.PACK_INSTR), ("read_bits", cost.BITS_INSTR)):
        if abs(probe[name] - model) > 0.05 * model:
            failures.append(f"stored mask: {name} costs {probe[name]} instructions per element, the model {model}")
    if probe["keep_mask"] > probe["tl.rand"] / 4:
        failures.append(f"mask {probe['keep_mask']} > 1/4 of tl.rand's {probe['tl.rand']} per element")
    log(f"live: {len(cache)} compiles, mask probe {probe}")
    return failures


# ---------------------------------------------------------------- main


def run(subset: str | None, archs: tuple[int, ...], reuse: dict | None, log=print) -> dict:
    cache = dict(reuse or {})
    cases = []
    start = time.time()
    for dtype_name, R, arch in grid() if subset is None else CI_SUBSET:
        if arch not in archs:
            continue
        for p in (0.0, 0.1):
            for design in DESIGNS:
                cases.append(run_case(dtype_name, R, p, design, arch, cache))
        log(f"sm_{arch} {dtype_name} R={R}: {len(cache)} compiles cached, {time.time() - start:.0f} s")
    # The largest operands (fp32, R = 256, dropout, both designs): each launch's fallback alone, for sm_80.
    fallbacks = [
        run_case(d, 256, 0.1, design, 80, cache, fallback=True)
        for d in ("fp32-ieee", "fp32-tf32")
        for design in ("fused", "split")
    ]
    used = set().union(*(case.pop("keys") for case in cases + fallbacks))
    probes = {arch: probe_mask(arch, cache, used) for arch in archs if arch in MAIN_TARGETS}
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
    ap.add_argument("--subset", choices=["ci"], help="only the CI cases")
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    ap.add_argument("--out", type=pathlib.Path, help=f"results JSON (default {RESULTS.relative_to(ROOT)}, full run)")
    ap.add_argument("--reuse", type=pathlib.Path, nargs="*", default=[], help="more result files to take compiles from")
    ap.add_argument("--write-docs", action="store_true", help="refresh the tables in docs/KERNELS.md")
    ap.add_argument("--verify", action="store_true", help="CI: check the committed results, compile a few live")
    args = ap.parse_args(argv)
    if args.verify:
        failures = verify()
        for f in failures:
            print("FAIL:", f, file=sys.stderr)
        print("compile tier verified" if not failures else f"{len(failures)} failures")
        return 1 if failures else 0
    out = args.out or (RESULTS if args.subset is None else None)
    reuse: dict = {}
    for path in [*args.reuse, *([out] if out is not None else [])]:
        if path.exists():
            reuse.update(json.loads(path.read_text()).get("cache", {}))
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
