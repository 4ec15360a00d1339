"""Packaging: the kernels install as ``lora_fast.kernels``, and PyPI's own ``kernels`` package keeps its name.

The repository's top-level ``kernels/`` folder holds the kernel modules and no ``__init__.py``; ``lora_fast/kernels``
is a link to it. A process started at the repository root has the root first on ``sys.path``, but a folder without
``__init__.py`` is only a namespace portion, and Python takes a regular package (PyPI's ``kernels``, which
transformers imports) wherever it is on the path before any namespace portion (docs/ARCHITECTURE.md).
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


def _pypi_kernels_init() -> pathlib.Path:
    """Where PyPI's ``kernels`` package is installed (its ``__init__.py``), or a skip saying it is not."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's `kernels` package is not installed (the `dev` extra installs it)")
    return pathlib.Path(dist.locate_file("kernels/__init__.py")).resolve()


def _python(code_or_args, cwd, timeout=300) -> subprocess.CompletedProcess:
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(map(str, code_or_args))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
    packages = [p.parent for p in (ROOT / "lora_fast").rglob("__init__.py")]
    assert len(packages) >= 3  # lora_fast, lora_fast.study, lora_fast.gguf at least
    for package in packages:
        for module in package.glob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names, f"{module.relative_to(ROOT)} is missing from the wheel"
    kernel_files = {n.removeprefix("lora_fast/kernels/") for n in names if n.startswith("lora_fast/kernels/")}
    assert kernel_files == {p.name for p in (ROOT / "kernels").glob("*.py")}


def test_the_kernels_folder_is_not_a_regular_package():
    """The layout the import tests below rely on: no ``kernels/__init__.py``, and ``lora_fast/kernels`` links to it."""
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py shadows PyPI's kernels from the root"
    link = ROOT / "lora_fast" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_kernels_finds_pypis_package(where, tmp_path):
    """``python -c "import kernels"`` at the repository root (first on ``sys.path``) and in another folder gets
    PyPI's package, the one transformers imports, and ``lora_fast.kernels`` still is ours."""
    theirs = _pypi_kernels_init()
    code = "import kernels, lora_fast.kernels.cost as c; print(kernels.__file__); print(c.__file__)"
    out = _python(code, ROOT if where == "root" else tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels_file, cost_file = out.stdout.split()
    assert pathlib.Path(kernels_file).resolve() == theirs
    assert pathlib.Path(cost_file).resolve() == (ROOT / "kernels" / "cost.py").resolve()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
@pytest.mark.parametrize("script", ["train_sentiment.py", "train_dpo.py", "bench/run.py"])
def test_scripts_start_from_the_root_and_from_elsewhere(script, where, tmp_path):
    """A script's own folder goes first on ``sys.path`` (the root for train_*.py), whatever the working folder."""
    _pypi_kernels_init()
    out = _python([ROOT / script, "--help"], ROOT if where == "root" else tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_a_model_loads_in_a_process_started_at_the_root(tmp_path):
    """transformers imports PyPI's ``kernels`` while it loads a model: from the root, that must not find ours."""
    _pypi_kernels_init()
    code = (
        "import sys\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(sys.argv[1])\n"
        "print(type(GPT2LMHeadModel.from_pretrained(sys.argv[1])).__name__)\n"
    )
    out = _python(["-c", code, tmp_path / "m"], ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "GPT2LMHeadModel"


def test_a_top_level_kernels_package_is_untouched(tmp_path):
    """A top-level ``kernels`` package (a stand-in at the end of ``sys.path`` here) still imports as itself beside
    ours, whichever is imported first: ours lives at ``lora_fast.kernels`` only, and importing it registers no
    top-level ``kernels``. Where PyPI's package is installed it may come before the stand-in; what must never answer
    ``import kernels`` is our folder."""
    standin = tmp_path / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    ours_first = "import lora_fast.kernels.cost as ours\nassert 'kernels' not in sys.modules\nimport kernels\n"
    theirs_first = "import kernels\nimport lora_fast.kernels.cost as ours\n"
    for order in (ours_first, theirs_first):
        code = f"import sys\nsys.path.append(sys.argv[1])\n{order}print(kernels.__file__, ours.__file__, ours.__name__)"
        out = _python(["-c", code, standin.parent], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        theirs, ours, ours_name = out.stdout.split()
        assert ours_name == "lora_fast.kernels.cost" and pathlib.Path(ours).parent.name == "kernels"
        assert pathlib.Path(theirs).parent != pathlib.Path(ours).parent, "our kernels/ answers `import kernels`"
        assert pathlib.Path(theirs) == standin / "__init__.py" or "site-packages" in pathlib.Path(theirs).parts, theirs
