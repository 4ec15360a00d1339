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
    assert "lora_fast/kernels/__init__.py" in names and "lora_fast/study/__init__.py" in names
    kernel_files = [n for n in names if n.startswith("lora_fast/kernels/") and n.endswith(".py")]
    source_files = [p for p in (ROOT / "kernels").glob("*.py")]
    assert len(kernel_files) == len(source_files)


def test_a_top_level_kernels_package_is_untouched(tmp_path):
    """A top-level ``kernels`` package (PyPI has a popular one; a stand-in at the end of ``sys.path`` here) still
    imports as itself beside ours, whichever is imported first: ours lives at ``lora_fast.kernels`` only, and
    importing it registers no top-level ``kernels``. Where PyPI's package is installed it may come before the
    stand-in; what must never answer ``import kernels`` is our folder."""
    standin = tmp_path / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    ours_first = "import lora_fast.kernels as ours\nassert 'kernels' not in sys.modules\nimport kernels\n"
    theirs_first = "import kernels\nimport lora_fast.kernels as ours\n"
    for order in (ours_first, theirs_first):
        code = f"import sys\nsys.path.append(sys.argv[1])\n{order}print(kernels.__file__, ours.__file__, ours.__name__)"
        out = subprocess.run(
            [sys.executable, "-c", code, str(standin.parent)], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        theirs, ours, ours_name = out.stdout.split()
        assert ours_name == "lora_fast.kernels" and pathlib.Path(ours).parent.name == "kernels"
        assert pathlib.Path(theirs).parent != pathlib.Path(ours).parent, "our kernels/ answers `import kernels`"
        assert pathlib.Path(theirs) == standin / "__init__.py" or "site-packages" in pathlib.Path(theirs).parts, theirs
