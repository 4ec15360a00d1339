"""The package's rooms and the direction of their imports: ``kernels/`` (installed as ``lora_fast.kernels``) imports
torch and triton only, never ``lora_fast``; the library (``lora_fast/`` without ``study/``) never imports the study;
and the library works with nothing installed but its own dependencies (torch, triton, safetensors). The test files
that the docs and sources name are where they say (the study's in ``tests/study/``)."""

import ast
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT

KERNELS = sorted((ROOT / "kernels").glob("*.py"))
LIBRARY = sorted(p for p in (ROOT / "lora_fast").rglob("*.py") if "study" not in p.relative_to(ROOT).parts)


def imported_modules(path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (function bodies too), relative imports resolved against
    ``package`` (the dotted name of the file's own package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module` names a module
            found.add(module)
    return found


def test_the_rooms_hold_files():
    assert len(KERNELS) >= 4 and len(LIBRARY) >= 8  # the globs above find the sources they are meant to guard


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_kernels_never_import_lora_fast(path):
    bad = {m for m in imported_modules(path, "lora_fast.kernels") if m.split(".")[0] == "lora_fast"}
    bad = {m for m in bad if not m.startswith("lora_fast.kernels")}  # its own relative imports
    assert not bad, f"{path.name} imports {sorted(bad)}: kernels/ may import torch and triton only"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_study(path):
    package = ".".join(path.relative_to(ROOT).parent.parts)
    bad = {m for m in imported_modules(path, package) if m == "lora_fast.study" or m.startswith("lora_fast.study.")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the library must not depend on the study"


def test_imports_are_resolved_the_way_python_does(tmp_path):
    """The checker itself: a relative import that climbs out of kernels/ and one into the study are both caught."""
    (tmp_path / "k.py").write_text("from .. import model\nfrom .lora_forward import lora_forward\n")
    (tmp_path / "l.py").write_text("def f():\n    from .study import training\n")
    assert "lora_fast.model" in imported_modules(tmp_path / "k.py", "lora_fast.kernels")
    assert "lora_fast.study.training" in imported_modules(tmp_path / "l.py", "lora_fast")


def test_the_library_runs_without_the_study_dependencies(tmp_path):
    """With transformers, datasets, tqdm, matplotlib and peft made unimportable, the library still imports, puts
    LoRA into a plain torch model, and saves and loads its adapter."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = {"transformers", "datasets", "tqdm", "matplotlib", "peft", "pyarrow"}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is not installed")

        sys.meta_path.insert(0, Block())
        import torch
        import lora_fast, lora_fast.kernels

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        lora_fast.apply_lora(model, ["0", "2"], r=2, alpha=4)
        torch.nn.init.normal_(model[0].lora_B)
        x = torch.randn(3, 8)
        lora_fast.save_adapter(model, sys.argv[1])
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if "lora" not in k})
        lora_fast.load_adapter(fresh, sys.argv[1])
        assert torch.equal(fresh(x), model(x))
        assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "adapter")], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_test_file_the_docs_and_comments_name_exists():
    # The study's tests live in tests/study/, the library's in tests/: a path to a test file that moved is stale.
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *KERNELS, *LIBRARY, ROOT / "setup.py"]
    texts += sorted((ROOT / "bench").glob("*.sh")) + sorted((ROOT / "bench").glob("*.py"))
    named = {m for path in texts for m in re.findall(r"\btests/[\w/]*test_\w+\.py", path.read_text(encoding="utf-8"))}
    assert len(named) >= 5  # the pattern finds the references it guards
    assert sorted(name for name in named if not (ROOT / name).is_file()) == []


# Test files about the project as a whole, not one module: its layout, its packaging, its requirements files.
PROJECT_TESTS = {"test_layout.py", "test_packaging.py", "test_requirements.py"}
# Each sub-package's tests live in the folder of that name; tests of bench/ only in tests/bench/.
MIRRORS = {"kernels": ROOT / "kernels", "gguf": ROOT / "lora_fast" / "gguf", "study": ROOT / "lora_fast" / "study"}
MIRRORS |= {"bench": ROOT / "bench", "real": None}  # tests/real: the real-model tier, across modules


def test_tests_mirror_the_modules_they_test():
    """``tests/test_<module>[_<aspect>].py`` for ``lora_fast/<module>.py``; a folder per sub-package."""
    modules = {p.stem for p in (ROOT / "lora_fast").glob("*.py") if p.stem != "__init__"}
    tests = ROOT / "tests"
    strays = [
        p.name
        for p in tests.glob("test_*.py")
        if p.name not in PROJECT_TESTS
        and not any(p.stem == f"test_{m}" or p.stem.startswith(f"test_{m}_") for m in modules)
    ]
    assert strays == [], f"test files that name no lora_fast module: {strays}"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == set(MIRRORS), folders
    assert all(path is None or path.is_dir() for path in MIRRORS.values())
    bench_tests = [str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py") if p.parent.name != "bench"]
    assert [
        p for p in bench_tests if re.search(r"^\s*(from bench\b|import bench\b)", (ROOT / p).read_text(), re.M)
    ] == []


def test_no_test_folder_shadows_an_installed_module():
    """pytest imports test files by path (``--import-mode=importlib``) and puts no test folder on ``sys.path``: else,
    without the optional ``gguf`` package, ``import gguf`` would find ``tests/gguf/`` and the tests that should skip
    for want of it would fail instead."""
    import importlib.util

    for folder in (p for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name.isidentifier()):
        spec = importlib.util.find_spec(folder.name)
        places = [] if spec is None else [*(spec.submodule_search_locations or []), spec.origin or ""]
        assert not [p for p in places if str(p).startswith(str(folder))], (folder.name, places)
