"""Packaging: the kernels install as ``lora_fast.kernels``, and PyPI's own ``kernels`` package keeps its name."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # keep build/ out of the source tree
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=build,
    )
    (path,) = out.glob("lora_fast-*.whl")
    return path


def test_wheel_installs_only_lora_fast_at_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lora_fast"}
    assert "lora_fast/kernels/__init__.py" in names
    kernel_files = [n for n in names if n.startswith("lora_fast/kernels/") and n.endswith(".py")]
    source_files = [p for p in (ROOT / "kernels").glob("*.py")]
    assert len(kernel_files) == len(source_files)


def test_pypi_kernels_package_is_untouched(tmp_path):
    """Both packages import side by side from outside the repository: ours as lora_fast.kernels, PyPI's as kernels."""
    pytest.importorskip("kernels", reason="PyPI's `kernels` is a dev dependency: pip install -e '.[dev]'")
    code = (
        "import kernels, lora_fast.kernels as ours, pathlib;"
        "print(pathlib.Path(kernels.__file__).parent.parent.name, pathlib.Path(ours.__file__).parent.name);"
        "print(hasattr(kernels, 'get_kernel'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    where, ours_dir, has_api = out.stdout.split()
    assert where == "site-packages" and ours_dir == "kernels" and has_api == "True"
