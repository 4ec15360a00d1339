"""The exact versions of a green run, written and compared by a script, never by hand.

    python requirements/freeze.py            # after `python -m pytest` passed here: writes requirements/tested.txt
    python requirements/freeze.py --diff     # what this environment has that differs from tested.txt (CI prints it)

``tested.txt`` lists every distribution installed in the environment (``name==version``), the project itself and
pip left out, with a header naming the date, Python, the platform and the CPU. It is what the README's published numbers
were produced with: ``pip install -r requirements/tested.txt`` (torch's build label such as ``+cpu`` is dropped; on
a machine without a GPU install torch's CPU build first, as the README says). CI installs the newest releases, as a
newcomer does, and prints ``--diff`` so a release that moved under us is seen beside the test results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

TESTED = Path(__file__).resolve().parent / "tested.txt"
SKIP = {"lora-fast", "pip"}  # the project itself, and the installer


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """``{normalised name: version}`` of every installed distribution but ours; local build labels dropped."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _normal(name) not in SKIP:
            found[_normal(name)] = dist.version.split("+")[0]
    return dict(sorted(found.items()))


def read_tested(path: Path = TESTED) -> dict[str, str]:
    """The pins of ``path`` (``name==version`` lines; comments and blank lines skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_normal(name)] = version.strip()
    return pins


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def write(path: Path = TESTED) -> Path:
    """Write ``path`` atomically (a temporary file renamed over it)."""
    header = [
        "# The exact versions of the last green run (python -m pytest passed), written by requirements/freeze.py.",
        f"# {datetime.date.today().isoformat()}, Python {platform.python_version()}, {platform.platform()}, {_cpu()}",
        "# Reproduce: pip install torch==<the torch line> (CPU build where there is no GPU), then",
        "#            pip install -r requirements/tested.txt && pip install --no-deps -e .",
    ]
    body = [f"{name}=={version}" for name, version in installed().items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(header + body) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def diff(path: Path = TESTED) -> list[str]:
    """One line per distribution whose version here differs from ``path`` (or that only one side has)."""
    here, tested = installed(), read_tested(path)
    lines = []
    for name in sorted(set(here) | set(tested)):
        a, b = tested.get(name), here.get(name)
        if a != b:
            lines.append(f"{name}: tested {a or '-'}, here {b or '-'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python requirements/freeze.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--diff", action="store_true", help="print what differs from tested.txt instead of writing")
    args = parser.parse_args(argv)
    if args.diff:
        lines = diff()
        print(f"{len(lines)} versions differ from {TESTED}" + "".join(f"\n  {line}" for line in lines))
        return 0
    print(f"wrote {write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
