"""The files of BitFit and bottleneck adapters (``lora_fast.study.method_files``) under kills."""

import pytest
import torch

from lora_fast.study.bitfit import load_bitfit, prepare_bitfit, save_bitfit
from lora_fast.study.bottleneck import apply_bottleneck_adapters, load_bottleneck_adapters, save_bottleneck_adapters
from tests.helpers import kill_at_rename
from tests.study.method_models import tiny


def _trained(prepare, seed):
    """The same base (``tiny()``) with the method's trainable parts drawn from ``seed``."""
    model, g = prepare(tiny()), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


SAVES = {
    "bitfit": (prepare_bitfit, save_bitfit, load_bitfit),
    "bottleneck": (apply_bottleneck_adapters, save_bottleneck_adapters, load_bottleneck_adapters),
}


@pytest.mark.parametrize("kill_at", [1, 2], ids=["old_folder_aside", "new_folder_in"])
@pytest.mark.parametrize("method", sorted(SAVES))
def test_a_save_killed_at_any_rename_leaves_the_previous_folder(tmp_path, monkeypatch, ids, method, kill_at):
    """The weights and config are swapped in as one folder: a kill at either of the swap's renames leaves the previous
    save, which the loader puts back from its hidden holder when the kill fell between the two."""
    prepare, save, load = SAVES[method]
    old, new = _trained(prepare, 1), _trained(prepare, 2)
    save(old, tmp_path / "best")
    kill_at_rename(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        save(new, tmp_path / "best")
    monkeypatch.undo()
    with torch.no_grad():
        got, want = load(tiny(), tmp_path / "best")(ids).logits, old(ids).logits
    assert torch.equal(got, want) and (tmp_path / "best").is_dir()
