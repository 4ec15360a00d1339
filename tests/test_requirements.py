"""requirements/freeze.py: tested.txt is written from the environment, and the drift from it is reported."""

import importlib.util

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("freeze", ROOT / "requirements" / "freeze.py")
freeze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(freeze)


def test_the_written_file_pins_what_is_installed_and_a_moved_release_is_reported(tmp_path):
    path = freeze.write(tmp_path / "tested.txt")
    pins = freeze.read_tested(path)
    assert pins == freeze.installed() and "torch" in pins and "lora-fast" not in pins and "pip" not in pins
    assert freeze.diff(path) == []
    text = path.read_text().replace(f"torch=={pins['torch']}", "torch==0.0.1") + "gone-package==1.0\n"
    path.write_text(text)
    assert freeze.diff(path) == ["gone-package: tested 1.0, here -", f"torch: tested 0.0.1, here {pins['torch']}"]


def test_the_committed_file_pins_the_stack():
    pins = freeze.read_tested(ROOT / "requirements" / "tested.txt")
    assert {"torch", "transformers", "peft", "safetensors", "triton"} <= set(pins)
    assert all(v and v[0].isdigit() for v in pins.values())
