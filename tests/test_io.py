"""lora_fast.io under real kills and real concurrency: an adapter folder saved again and again survives ``kill -9`` at
any moment as one whole adapter (the previous or the new one), and two processes saving into one folder take turns."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_fast
from lora_fast.io import atomic_write_text
from tests.helpers import ROOT

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
