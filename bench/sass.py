"""Compile one Triton kernel for a GPU this machine does not have, and read its resources and schedule from the cubin.

Used by :mod:`bench.compile_check`. The signature comes from the launch arguments through Triton's own
specialisation rules (types, divisibility by 16, integers equal to 1); ptxas's log gives registers, stack and spills;
``cuobjdump -sass`` the instructions, from which :func:`mma_loops` finds each loop that issues tensor-core MMAs and
counts its waits:

- sm_90: ``HGMMA`` (wgmma) and ``WARPGROUP.DEPBAR`` (``wgmma.wait_group``): a main loop that keeps its MMAs in
  flight shows a run of HGMMAs and one wait per iteration; one wait after every HGMMA means the tensor cores idle
  between instructions (a data-dependent branch in the loop did that to the fused dx);
- sm_100: ``UTC*MMA`` (tcgen05, accumulators in tensor memory); sm_80/86/89/120: ``HMMA`` (mma.sync).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, whatever the caller's environment

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def kernel_key(fn) -> str:
    """Triton's hash of a kernel's source and of every jit function and global it uses: a compile result is reused
    (by the tier and by the CI test) only while this and Triton's version are unchanged."""
    return f"{fn.cache_key[:16]}-triton{triton.__version__}"


def signature(fn, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
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


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of each instruction of ``cuobjdump -sass`` output (NOPs left out)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if m and not m.group(2).startswith("NOP"):
            out.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return out


def _is_mma(op: str) -> bool:
    return op.startswith(("HGMMA", "HMMA")) or (op.startswith("UTC") and "MMA" in op)


def mma_loops(instructions: list[tuple[int, str, str]]) -> list[dict]:
    """Each innermost loop (a backward branch's span) that issues MMAs: its address span, MMA and wgmma-wait counts
    per iteration (a static count of the loop body)."""
    loops = []
    for addr, op, operands in instructions:
        m = re.match(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [o for a, o, _ in instructions if start <= a <= addr]
            loops.append(
                dict(
                    start=start,
                    end=addr,
                    mma=sum(_is_mma(o) for o in body),
                    waits=sum(o.startswith("WARPGROUP.DEPBAR") for o in body),
                )
            )
    with_mma = [lp for lp in loops if lp["mma"]]
    # Innermost: no other MMA loop strictly inside it.
    return [
        lp
        for lp in with_mma
        if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in with_mma)
    ]


def compile_one(fn, args: tuple, constexprs: dict, config, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` with these launch arguments and read its resources and schedule back."""
    sig, consts, attrs = signature(fn, args, {**constexprs, **dict(config.meta)})
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
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    instructions = parse_sass(text)
    ops = [op for _, op, _ in instructions]
    loops = mma_loops(instructions)
    return dict(
        shared=compiled.metadata.shared,
        **_ptxas_stats(log.getvalue()),
        sass=len(ops),
        wgmma=sum(op.startswith("HGMMA") for op in ops),
        mma=sum(op.startswith("HMMA") for op in ops),
        tcgen05=sum(op.startswith("UTC") and "MMA" in op for op in ops),
        mma_loops=[[lp["mma"], lp["waits"]] for lp in loops],
        # The most wgmma waits in one iteration of any main loop (sm_90); None where no loop issues wgmma.
        wgmma_waits_per_iter=max((lp["waits"] for lp in loops), default=None) if arch == 90 else None,
        seconds=round(time.time() - start, 2),
    )
