"""``sharded_checkpoint``: the folder ``--parallel fsdp`` writes, read and written here by one process (DCP without a
process group; the 2-process runs are in ``test_fsdp.py``)."""

import pytest
import torch

from lora_fast import apply_lora
from lora_fast.study.checkpoint import CHECKPOINT_FILE, SHARDED_CHECKPOINT, resume, resume_path, save_checkpoint
from lora_fast.study.errors import CheckpointError, NonFiniteError
from lora_fast.study.sharded_checkpoint import META_NAME, load_sharded_checkpoint, save_sharded_checkpoint
from lora_fast.study.training import make_optimizer, make_scheduler
from tests.helpers import kill_at_rename, model_snapshot, tiny_gpt2_config, unchanged_since


def _model(seed=0, r=4, targets=("attn.c_attn",)):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return apply_lora(GPT2LMHeadModel(tiny_gpt2_config(vocab_size=64)), list(targets), r=r, alpha=8)


def _state(seed=0, steps=2, **kw):
    """A model, optimizer and scheduler after ``steps`` AdamW steps on random tokens."""
    model = _model(seed, **kw)
    optimizer = make_optimizer(model, lr=1e-2)
    scheduler = make_scheduler(optimizer, warmup_steps=5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scheduler


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _continue(model, optimizer, scheduler, steps=2):
    """Further steps, with dropout-free noise from the RNG (so a restored RNG state matters too)."""
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return _trainable(model)


def test_round_trip_continues_bit_identically(tmp_path):
    model, optimizer, scheduler = _state()
    save_sharded_checkpoint(tmp_path / SHARDED_CHECKPOINT, model, optimizer, scheduler, None, 2, {"best": 1.5})
    assert {p.name for p in (tmp_path / SHARDED_CHECKPOINT).iterdir()} == {".metadata", "__0_0.distcp", META_NAME}
    expected = _continue(model, optimizer, scheduler)

    fresh, fresh_opt, fresh_sched = _state(steps=0)  # the same base weights, LoRA as initialised, a fresh optimizer
    torch.manual_seed(123)  # another RNG state, which the load must replace
    state = load_sharded_checkpoint(tmp_path / SHARDED_CHECKPOINT, fresh, fresh_opt, fresh_sched)
    assert state == {"step": 2, "extra": {"best": 1.5}}
    assert fresh_sched.last_epoch == 2
    got = _continue(fresh, fresh_opt, fresh_sched)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_model_that_does_not_fit_is_refused_untouched(tmp_path):
    model, optimizer, scheduler = _state()
    save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 2)
    for kw in ({"targets": ("attn.c_attn", "attn.c_proj")}, {"r": 8}):
        other, other_opt, _ = _state(seed=1, steps=0, **kw)
        before = model_snapshot(other)
        with pytest.raises(CheckpointError, match="does not fit this model|has shape"):
            load_sharded_checkpoint(tmp_path / "c", other, other_opt)
        assert unchanged_since(other, before)


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path):
    """A data file or the index missing, a meta.pt holding a pickled object or missing: a CheckpointError each."""
    model, optimizer, scheduler = _state()
    for part in ("__0_0.distcp", ".metadata"):
        save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 2)
        (tmp_path / "c" / part).unlink()
        with pytest.raises(CheckpointError, match="cannot be loaded|cannot be read"):
            load_sharded_checkpoint(tmp_path / "c", *_state(seed=1, steps=0)[:2])
    save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 2)
    meta = tmp_path / "c" / META_NAME
    state = torch.load(meta, weights_only=True)
    torch.save({**state, "extra": {"obj": CheckpointError("a pickled object")}}, meta)
    with pytest.raises(CheckpointError, match="other than tensors and plain values"):
        load_sharded_checkpoint(tmp_path / "c", *_state(seed=1, steps=0)[:2])
    meta.unlink()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_sharded_checkpoint(tmp_path / "c", *_state(seed=1, steps=0)[:2])


def test_nonfinite_state_is_not_written(tmp_path):
    model, optimizer, scheduler = _state()
    save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 2)
    files = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="would hold NaN or inf"):
        save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 3)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize("call", [1, 2])
def test_a_kill_during_the_swap_keeps_the_previous_checkpoint(tmp_path, monkeypatch, call):
    """Killed between the swap's two renames (old folder aside, new one in): the previous checkpoint loads."""
    model, optimizer, scheduler = _state()
    save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 2)
    _continue(model, optimizer, scheduler)
    kill_at_rename(monkeypatch, call)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_checkpoint(tmp_path / "c", model, optimizer, scheduler, None, 4)
    monkeypatch.undo()
    fresh, fresh_opt, _ = _state(seed=1, steps=0)
    assert load_sharded_checkpoint(tmp_path / "c", fresh, fresh_opt)["step"] == 2


def test_one_process_resumes_a_sharded_checkpoint_and_replaces_it(tmp_path):
    """``resume`` on a model that is not sharded reads ``checkpoint.dcp/`` when there is no ``checkpoint.pt``; the
    next ``save_checkpoint`` writes ``checkpoint.pt`` and removes the folder, so --out never holds both."""
    model, optimizer, scheduler = _state()
    data_order = {"seed": 0}
    extra = {"data_order": data_order}
    save_sharded_checkpoint(tmp_path / SHARDED_CHECKPOINT, model, optimizer, scheduler, None, 2, extra)
    fresh, fresh_opt, fresh_sched = _state(steps=0)
    assert resume_path(tmp_path / CHECKPOINT_FILE, fresh) == tmp_path / SHARDED_CHECKPOINT
    step, extra = resume(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt, fresh_sched, None, data_order)
    assert step == 2 and extra["data_order"] == data_order
    assert all(torch.equal(a, b) for a, b in zip(_trainable(fresh).values(), _trainable(model).values(), strict=True))
    with pytest.raises(CheckpointError, match="data order"):
        resume(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt, fresh_sched, None, {"seed": 1})
    save_checkpoint(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt, fresh_sched, None, 3, extra)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not (tmp_path / SHARDED_CHECKPOINT).exists()
