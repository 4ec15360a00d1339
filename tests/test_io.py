"""lora_fast.io under real kills and real concurrency: an adapter folder saved again and again survives ``kill -9`` at
any moment as one whole adapter (the previous or the new one), and two processes saving into one folder take turns;
a save leaves the folder's other files alone, and a crash between its renames, or its stale temporaries, are put right
by the next save or load."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_fast
from lora_fast import AdapterError, apply_lora, load_adapter, save_adapter
from lora_fast.io import atomic_write_text
from tests.helpers import ROOT, kill_at_rename
from tests.peft_models import logits_on_ids, randomise_lora, small_gpt2

# Two adapters of one small model, A (alpha 4) and B (alpha 16): their files differ in weights and in config.
MAKE = textwrap.dedent(
    """
    import torch, lora_fast

    def make(seed, alpha):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        lora_fast.apply_lora(model, ["0", "1"], r=4, alpha=alpha)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g))
        return model
    """
)
SAVER = MAKE + textwrap.dedent(
    """
    import sys
    a, b = make(1, 4.0), make(2, 16.0)
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        lora_fast.save_adapter(a if i % 2 else b, sys.argv[1])
    """
)


def _make(seed, alpha):
    namespace = {}
    exec(MAKE, namespace)
    return namespace["make"](seed, alpha)


def _saver(folder, saves):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(saves)], stdout=subprocess.PIPE, env=env,
                            text=True)  # fmt: skip


def _which(folder) -> str:
    """'A' or 'B': the adapter the folder loads as (weights and alpha both), or an AssertionError."""
    loaded = lora_fast.load_adapter(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), folder)
    got = lora_fast.lora_state_dict(loaded)
    for name, (seed, alpha) in {"A": (1, 4.0), "B": (2, 16.0)}.items():
        want = lora_fast.lora_state_dict(_make(seed, alpha))
        if all(torch.equal(got[k], want[k]) for k in want) and loaded.lora_config.alpha == alpha:
            return name
    raise AssertionError(f"{folder} loads as neither adapter")


@pytest.mark.slow
def test_random_kills_of_repeated_saves_leave_one_whole_adapter(tmp_path):
    rng = random.Random(0)
    seen = set()
    for i in range(8):
        folder = tmp_path / f"adapter{i}"
        proc = _saver(folder, 10_000)
        assert proc.stdout.readline().strip() == "ready"
        while not (folder / "adapter_config.json").exists():  # the first save is in
            pass
        try:  # a random while of saving, then kill -9, most likely in the middle of a save
            proc.wait(timeout=rng.uniform(0.05, 0.4))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.add(_which(folder))
    assert seen <= {"A", "B"}


def test_two_processes_saving_into_one_folder_both_succeed(tmp_path):
    folder = tmp_path / "adapter"
    procs = [_saver(folder, 40), _saver(folder, 40)]
    for proc in procs:
        proc.communicate(timeout=300)
    assert [proc.returncode for proc in procs] == [0, 0]
    assert _which(folder) == "A"  # every saver's last save is A (40 saves, B first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left beside it


def test_a_write_inside_a_write_of_the_same_folder_does_not_wait_for_itself(tmp_path):
    from lora_fast.io import atomic_directory

    with atomic_directory(tmp_path / "model") as tmp:
        atomic_write_text(tmp_path / "notes.txt", "written while the folder is being written")
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "notes.txt").is_file()


# ---------------------------------------------------------------- saving beside other files, crashes


def _tuned(seed, alpha=8):
    model = apply_lora(small_gpt2(), ["c_attn", "c_proj"], r=4, alpha=alpha)
    randomise_lora(model, seed)
    return model


def test_save_adapter_leaves_other_files_alone_and_refuses_a_file(tmp_path):
    folder = tmp_path / "run"
    (folder / "plots").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "README.md").write_text("notes")
    (folder / "plots" / "loss.png").write_bytes(b"png")
    model = _tuned(1)
    save_adapter(model, folder)
    save_adapter(_tuned(2), folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "plots",
    ]
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n' and (folder / "plots" / "loss.png").is_file()
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_adapter(model, target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("crash_at", [1, 2], ids=["old_folder_aside", "new_folder_in"])
def test_a_crash_during_save_leaves_the_previous_adapter_whole(tmp_path, monkeypatch, crash_at):
    """The pair is swapped in as one folder: a kill at either rename leaves the previous adapter (put back from its
    hidden holder by the loader), with its own config (alpha 8, not the new save's 32), for us and for PEFT."""
    path = tmp_path / "adapter"
    old, new = _tuned(1, alpha=8), _tuned(2, alpha=32)
    save_adapter(old, path)
    kill_at_rename(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, path)
    monkeypatch.undo()
    assert torch.equal(logits_on_ids(load_adapter(small_gpt2(), path)), logits_on_ids(old))
    assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_weights_from_another_save_than_the_config_are_refused_not_misread(tmp_path):
    """Two files of different saves (copied by hand, or written by an older version one at a time) are refused."""
    one, two = tmp_path / "one", tmp_path / "two"
    save_adapter(_tuned(1, alpha=8), one)
    save_adapter(_tuned(2, alpha=32), two)
    (two / "adapter_config.json").write_bytes((one / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterError, match="come from different saves .*lora_alpha=8 in the config but 32"):
        load_adapter(small_gpt2(), two)


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "adapter"
    save_adapter(_tuned(1), path)
    # What killed saves leave: per-file temporaries inside, former whole-folder temporaries beside.
    stale = [path / ".adapter_model.safetensors.k2j4h1x9.tmp", path / ".adapter_config.json.a0b1c2d3.tmp"]
    for f in stale:
        f.write_bytes(b"partial")
    (tmp_path / ".adapter.q1w2e3r4.old" / "adapter").mkdir(parents=True)
    (tmp_path / ".adapter.z9y8x7w6.tmp").mkdir()
    keep = [path / ".adapter_model.safetensors.tmp", tmp_path / ".adapter.notours"]  # not our naming
    for f in keep:
        f.write_bytes(b"user file")
    save_adapter(_tuned(2), path)
    assert not any(f.exists() for f in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.notours", "adapter"]
    assert all(f.read_bytes() == b"user file" for f in keep)


def test_a_kill_between_a_folder_swaps_renames_is_put_back(tmp_path, monkeypatch):
    from lora_fast.io import atomic_directory, recover_directory

    path = tmp_path / "best"
    with atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    kill_at_rename(monkeypatch, 2)  # 1: the old folder into its hidden holder, 2: the new one into place
    with pytest.raises(KeyboardInterrupt), atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    monkeypatch.undo()
    holders = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert not path.exists() and len(holders) == 1 and (holders[0] / "best" / "weights.bin").read_bytes() == b"old"
    (tmp_path / ".best.not-ours.old" / "best").mkdir(parents=True)  # not our naming: "-" is never drawn
    assert recover_directory(path) is True
    assert (path / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.not-ours.old", "best"]  # its holder is gone
    assert recover_directory(path) is False  # there already: nothing to do
    assert recover_directory(tmp_path / "never") is False and not (tmp_path / "never").exists()


def test_a_folder_write_after_a_kill_starts_from_the_old_folder(tmp_path):
    from lora_fast.io import atomic_directory

    path = tmp_path / "best"
    (tmp_path / ".best.a1b2c3d4.old" / "best").mkdir(parents=True)
    (tmp_path / ".best.a1b2c3d4.old" / "best" / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="failed"), atomic_directory(path):
        raise RuntimeError("the write failed")
    assert (path / "weights.bin").read_bytes() == b"old"  # a failed write keeps the old folder, put back first
    with atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (path / "weights.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_lora_adapter_left_aside_by_a_kill_loads(tmp_path):
    model = _tuned(1)
    save_adapter(model, tmp_path / "stash")
    (tmp_path / ".adapter.k2j4h1x9.old").mkdir()
    (tmp_path / "stash").rename(tmp_path / ".adapter.k2j4h1x9.old" / "adapter")
    assert torch.equal(logits_on_ids(load_adapter(small_gpt2(), tmp_path / "adapter")), logits_on_ids(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
