"""``python -m bench.run``, the benchmark tables' driver: its outputs default to a folder git ignores."""

import subprocess

import pytest

from tests.helpers import ROOT


def test_bench_outputs_default_to_an_ignored_folder(capsys):
    from bench import run as bench_run

    with pytest.raises(SystemExit):
        bench_run.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("bench/out/results.json", "bench/out/results.md", "bench/out/plots"):
        assert f"(default: {default})" in help_text
    paths = ["bench/out/results.json", "bench/out/results.md", "bench/out/plots/model_step.png"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == paths, ignored
