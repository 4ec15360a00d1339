"""pytest-benchmark set-up for ``pytest bench/ --benchmark-only``.

The layer benchmarks time real GEMMs for seconds each, so they run only when asked for with ``--benchmark-only``;
a plain ``pytest bench/`` skips them, with that reason. (The project's ``testpaths`` is ``tests``, so a bare
``pytest`` never collects this folder.)
"""

import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="timing benchmark: run with `pytest bench/ --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
