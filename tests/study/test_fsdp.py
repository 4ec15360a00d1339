"""FSDP2 (``--parallel fsdp``) on 2 CPU processes (gloo, ``torchrun --standalone``: a free port each time) against one
process, at LoRA dropout 0 and the same global batch.

Tolerances: fp64 runs (the library's ``train_step`` in ``fsdp_worker.py``) agree to 1e-12 (the sums of two
processes' gradients in another order; AdamW's update is of order lr, so its rounding stays near fp64's epsilon);
fp32 runs (the scripts, and Triton's interpreter) to 1e-5, as the DDP test of the scripts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_sentiment
from lora_fast.study import distributed
from lora_fast.study.errors import UsageError
from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import OFFLINE_ENV, ROOT, error_lines
from tests.study import fsdp_worker as worker

FP64 = {"rtol": 1e-12, "atol": 1e-12}
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def torchrun(args, timeout: float = 600, nproc: int = 2, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``torchrun --standalone --nproc_per_node NPROC ARGS`` at the repository root, offline, one thread per process
    (``python -m torch.distributed.run``: no need for the ``torchrun`` script on PATH). With ``popen`` (e.g.
    ``stdout=...``) the process is returned running."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += list(map(str, args))
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT)}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, **popen)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the library: fp64, every backend, PEFT


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """``fsdp_worker.py``'s results on 2 CPU processes."""
    out = tmp_path_factory.mktemp("worker") / "results.pt"
    proc = torchrun([ROOT / "tests/study/fsdp_worker.py", out])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(worker.CPU_CASES))
def test_sharded_training_equals_one_process(sharded, case):
    """Losses and LoRA weights after 3 AdamW steps (2 micro-batches per process, gradients reduced once per step)
    equal one process's over all 4 micro-batches; inside each forward the LoRA op saw plain tensors, never a DTensor;
    each process held half of the frozen weights."""
    kind, backend, dtype, amp = worker.CPU_CASES[case]
    model = worker.lora_model(kind, backend, dtype)
    start = worker.trainable(model)
    losses = worker.train(model, torch.device("cpu"), amp)
    weights, got = worker.trainable(model), sharded[case]
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), **tol)
    assert got["weights"].keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(got["weights"][name], weights[name], **tol)
    assert max((weights[n] - start[n]).abs().max().item() for n in weights) > 1e-2  # they trained
    assert got["forwards"] > 0 and not any("DTensor" in seen for seen in got["seen"]), got["seen"]
    whole = got["frozen_bytes"][0][1]
    assert sum(held for held, _ in got["frozen_bytes"]) == whole
    assert all(abs(held / whole - 0.5) < 0.01 for held, _ in got["frozen_bytes"]), got["frozen_bytes"]


@pytest.mark.slow
def test_patch_peft_under_fsdp_gives_peft_losses(sharded):
    """A PEFT model sharded as accelerate sets it up (layers, then the PEFT model), patched or not, trains with one
    process's unpatched losses; every patched layer ran lora_linear inside FSDP's forward (no fallback)."""
    alone = worker.peft_train(worker.peft_model(False)[0], torch.device("cpu"))
    for case in ("peft-unpatched", "peft-patched"):
        torch.testing.assert_close(torch.tensor(sharded[case]["losses"]), torch.tensor(alone), **FP64)
    assert sharded["peft-patched"]["fast_layers"] == 6 and sharded["peft-patched"]["fallbacks"] == ["None"]
    assert alone[-1] != alone[0]


@pytest.mark.slow
def test_accumulated_micro_batches_are_reduced_once(sharded):
    """Under ``distributed.no_sync`` a backward leaves no sharded gradient (no reduce-scatter ran); the next backward,
    outside it, reduces both micro-batches' gradients into every shard."""
    got = sharded["accumulation"]
    assert got["trainable"] > 0 and got["sharded_grads_after_each_backward"] == [0, got["trainable"]]


@pytest.mark.slow
def test_lockstep_and_full_parameters(sharded):
    """Rank 0 ran three forwards, rank 1 one, inside ``lockstep``: both left it, rank 1 having run two placeholders,
    and the outputs were one process's. ``full_parameters(write_back=True)`` showed a whole tensor and put what was
    written into it back into the shards, and nothing else. Merging sharded weights is refused by name."""
    got = sharded["lockstep"]
    assert got["outputs_match_one_process"] and got["block0_forwards_per_rank"] == [3, 3]
    assert got["gathered_type"] == "Parameter" and got["sharded_after"]
    assert got["written_back"] and got["others_untouched"]
    assert "the base weight is sharded" in got["merge"]


# ---------------------------------------------------------------- the script: files, checkpoints, a killed rank


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)


def run_args(tiny, data_dir, out, steps: int = 8) -> list[str]:
    """A short run's flags; fp32 and padded batches, so one process and several compute the same way."""
    return ["--model", str(tiny), "--data-dir", str(data_dir), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--grad-accum", "4", "--lora-dropout", "0", "--eval-every", "4",
            "--checkpoint-every", "2", "--max-val", "32", "--max-test", "32", "--eval-batch-size", "16",
            "--lr", "5e-3", "--no-zero-shot", "--dtype", "fp32", "--packing", "off"]  # fmt: skip


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _adapter(out, which="adapter_last"):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / which / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny, data_dir):
    """The same run on one process and under ``torchrun --parallel fsdp`` (2 processes)."""
    root = tmp_path_factory.mktemp("runs")
    assert train_sentiment.main(run_args(tiny, data_dir, root / "one")) == 0
    proc = torchrun(["train_sentiment.py", *run_args(tiny, data_dir, root / "fsdp"), "--parallel", "fsdp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.slow
def test_fsdp_run_equals_one_process_and_writes_its_files(runs, tiny):
    from transformers import GPT2LMHeadModel

    from lora_fast import load_adapter, merge_and_unload

    one, two = runs / "one", runs / "fsdp"
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("train_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), **FP32)
    val = lambda rows: {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}  # noqa: E731
    assert val(b).keys() == val(a).keys() == {4, 8}
    torch.testing.assert_close(torch.tensor(list(val(b).values())), torch.tensor(list(val(a).values())), **FP32)
    for which in ("adapter_best", "adapter_last"):  # gathered on rank 0: one process's files
        assert (two / which / "adapter_config.json").read_text() == (one / which / "adapter_config.json").read_text()
        x, y = _adapter(one, which), _adapter(two, which)
        assert x.keys() == y.keys() and x
        for k in x:
            torch.testing.assert_close(y[k], x[k], **FP32)
    # Merging runs on one process, from the gathered adapter: the merged model is one process's.
    merged = [
        merge_and_unload(load_adapter(GPT2LMHeadModel.from_pretrained(tiny), d / "adapter_last")) for d in (one, two)
    ]
    for (name, x), y in zip(merged[0].state_dict().items(), merged[1].state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, **FP32, msg=name)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["test"] == s1["test"] and s2["parallel"] == "fsdp" and s2["world_size"] == 2  # generation in lockstep
    assert s2["frozen_weights_mb_this_process"] == pytest.approx(s2["frozen_weights_mb"] / 2, rel=0.01)
    assert s1["frozen_weights_mb_this_process"] == s1["frozen_weights_mb"]
    ckpt = two / "checkpoint.dcp"
    assert {p.name for p in ckpt.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}
    assert not (two / "checkpoint.pt").exists() and not [p for p in two.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bitfit", "bottleneck"])
def test_other_methods_under_fsdp_equal_one_process(tiny, data_dir, tmp_path, method):
    """BitFit trains biases in the root's group too (``ln_f``), which an evaluation's forward leaves gathered: its
    checkpoints and files must still see the shards. Bottleneck adapters add modules inside the blocks."""
    args = [*run_args(tiny, data_dir, tmp_path / "one", steps=4), "--method", method, "--eval-every", "2"]
    assert train_sentiment.main(args) == 0
    args[args.index("--out") + 1] = str(tmp_path / "fsdp")
    proc = torchrun(["train_sentiment.py", *args, "--parallel", "fsdp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "fsdp")
    losses = [torch.tensor([r["train_loss"] for r in rows]) for rows in (b, a)]
    torch.testing.assert_close(*losses, **FP32)
    from safetensors.torch import load_file

    files = sorted(p.name for p in (tmp_path / "one" / "adapter_last").iterdir())
    assert sorted(p.name for p in (tmp_path / "fsdp" / "adapter_last").iterdir()) == files
    weights = next(f for f in files if f.endswith(".safetensors"))
    x, y = (load_file(str(tmp_path / d / "adapter_last" / weights)) for d in ("one", "fsdp"))
    assert x.keys() == y.keys() and x
    for k in x:
        torch.testing.assert_close(y[k], x[k], **FP32)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` that torchrun (pid ``parent``) started, or None (not yet)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_resumes_bit_identically(runs, tiny, data_dir, tmp_path):
    """SIGKILL of rank 1 once the first sharded checkpoint is on disk (wherever the run is then, a later
    checkpoint's write included) stops the run; --resume finishes it with the uninterrupted run's losses and
    adapters, bit for bit."""
    out = tmp_path / "killed"
    args = ["train_sentiment.py", *run_args(tiny, data_dir, out), "--parallel", "fsdp"]
    proc = torchrun(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint.dcp" / "meta.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None and proc.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not (out / "summary.json").exists(), stderr[-2000:]
    resumed = torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    full, cut = _metrics(runs / "fsdp"), _metrics(out)
    assert [r["step"] for r in cut] == list(range(1, 9))
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in full]
    for which in ("adapter_best", "adapter_last"):
        x, y = _adapter(runs / "fsdp", which), _adapter(out, which)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_one_process_and_back(runs, tiny, data_dir, tmp_path):
    """Another world size: a 2-process FSDP checkpoint resumes on one process (DCP reads both shards into whole
    tensors), which replaces it by its own checkpoint.pt; FSDP refuses to resume that file by name; one process
    finishes the run with the one-process run's losses and adapter."""
    out = tmp_path / "cut"
    base = run_args(tiny, data_dir, out)
    proc = torchrun(["train_sentiment.py", *base, "--parallel", "fsdp", "--stop-after-step", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoint.dcp").is_dir() and not (out / "checkpoint.pt").exists()
    assert train_sentiment.main([*base, "--resume", "--stop-after-step", "6"]) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / "checkpoint.dcp").exists()
    refused = torchrun(["train_sentiment.py", *base, "--parallel", "fsdp", "--resume"])
    assert refused.returncode != 0 and "--parallel fsdp resumes its own checkpoint.dcp/" in refused.stderr
    assert train_sentiment.main([*base, "--resume"]) == 0
    one, cut = _metrics(runs / "one"), _metrics(out)
    assert [r["step"] for r in cut] == list(range(1, 9))
    losses = [torch.tensor([r["train_loss"] for r in rows]) for rows in (cut, one)]
    torch.testing.assert_close(*losses, **FP32)
    x, y = _adapter(runs / "one"), _adapter(out)
    for k in x:
        torch.testing.assert_close(y[k], x[k], **FP32)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_three_fsdp_processes(tiny, data_dir, tmp_path):
    """N to M: a checkpoint 2 FSDP processes wrote resumes on 3 (DCP reshards every weight and moment), and the run
    ends as one process's does (24 sequences per step: 6 micro-batches of 4, 3 per process on 2, 2 on 3)."""
    one, cut = tmp_path / "one", tmp_path / "cut"
    base = lambda out: [*run_args(tiny, data_dir, out, steps=6), "--grad-accum", "6"]  # noqa: E731
    assert train_sentiment.main(base(one)) == 0
    proc = torchrun(["train_sentiment.py", *base(cut), "--parallel", "fsdp", "--stop-after-step", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = torchrun(["train_sentiment.py", *base(cut), "--parallel", "fsdp", "--resume"], nproc=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name for p in (cut / "checkpoint.dcp").iterdir()} >= {f"__{r}_0.distcp" for r in range(3)}
    a, b = _metrics(one), _metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    losses = [torch.tensor([r["train_loss"] for r in rows]) for rows in (b, a)]
    torch.testing.assert_close(*losses, **FP32)
    x, y = _adapter(one), _adapter(cut)
    for k in x:
        torch.testing.assert_close(y[k], x[k], **FP32)


# ---------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_dirs(tmp_path_factory, tiny):
    """A sentiment scorer adapter (random B) on the tiny model."""
    from transformers import GPT2LMHeadModel

    from lora_fast import apply_lora, lora_modules, save_adapter

    root = tmp_path_factory.mktemp("dpo")
    scorer = apply_lora(GPT2LMHeadModel.from_pretrained(tiny), ["attn.c_attn"], r=4, alpha=8)
    torch.manual_seed(0)
    for _, layer in lora_modules(scorer):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_adapter(scorer, root / "scorer")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_train_dpo_under_torchrun_equals_one_process(dpo_dirs, tiny, data_dir, tmp_path, parallel):
    """Each process takes half of every step's pairs; sampling, scoring and evaluation run whole on each (FSDP: in
    lockstep). Losses, rewards, KLs and the adapter equal one process's."""
    import train_dpo

    args = ["--model", tiny, "--scorer", dpo_dirs / "scorer", "--data-dir", data_dir, "--num-prompts", "8",
            "--samples-per-prompt", "3", "--num-eval-prompts", "4", "--eval-samples", "2", "--max-new-tokens", "5",
            "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--betas", "0.1", "1.0", "--beta", "0.1",
            "--device", "cpu", "--dtype", "fp32", "--packing", "off"]  # fmt: skip
    assert train_dpo.main([*map(str, args), "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(["train_dpo.py", *args, "--out", tmp_path / "two", "--parallel", parallel])
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [(r["event"], r.get("step")) for r in two] == [(r["event"], r.get("step")) for r in one]
    for key in ("loss", "reward_margin", "reward_accuracy", "kl", "reward"):
        x = [r[key] for r in one if key in r]
        assert x, key
        torch.testing.assert_close(torch.tensor([r[key] for r in two if key in r]), torch.tensor(x), **FP32)
    assert len({r["loss"] for r in one if r["event"] == "train"}) > 1  # it trained
    x, y = _adapter(tmp_path / "one", "adapter"), _adapter(tmp_path / "two", "adapter")
    for k in x:
        torch.testing.assert_close(y[k], x[k], **FP32)


# ---------------------------------------------------------------- refusals


def test_fsdp_flag_refusals(tiny, data_dir, tmp_path, capsys):
    """--parallel fsdp on one process, or with a method whose files are the whole model, or with fp16's GradScaler,
    is refused by name before anything loads."""
    assert train_sentiment.main([*run_args(tiny, data_dir, tmp_path / "o"), "--parallel", "fsdp"]) == 2
    assert "--parallel fsdp shards the model over several processes" in error_lines(capsys.readouterr().err)[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="--method full"):
        distributed.check_parallel("fsdp", 2, "full")
    with pytest.raises(UsageError, match="--dtype fp16"):
        distributed.check_parallel("fsdp", 2, "lora", "fp16")
    distributed.check_parallel("fsdp", 2, "bitfit", "bf16")
    distributed.check_parallel("ddp", 1, "full", "fp16")


# ---------------------------------------------------------------- CUDA tier


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="CUDA tier: needs 2 CUDA devices (FSDP over 2 GPUs, nccl)")
def test_fsdp_on_two_gpus(tmp_path):
    """The worker on 2 GPUs (nccl): Triton's kernels on the weights FSDP gathers, fp32 and bf16 mixed precision,
    against one GPU. bf16: FSDP computes in bf16 throughout (its policy casts the weights and each block's input),
    one GPU under autocast keeps fp32 where autocast does, so the losses agree to bf16's precision only."""
    out = tmp_path / "results.pt"
    proc = torchrun([ROOT / "tests/study/fsdp_worker.py", out, "--device", "cuda"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    device = torch.device("cuda", 0)
    for case, (kind, backend, dtype, amp) in worker.CUDA_CASES.items():
        model = worker.lora_model(kind, backend, dtype).to(device)
        losses = worker.train(model, device, amp)
        tol = FP32 if amp is None else {"rtol": 3e-2, "atol": 3e-2}
        torch.testing.assert_close(torch.tensor(got[case]["losses"]), torch.tensor(losses), **tol)
        assert not any("DTensor" in seen for seen in got[case]["seen"])
    assert got["lockstep"]["outputs_match_one_process"] and got["lockstep"]["block0_forwards_per_rank"] == [3, 3]
