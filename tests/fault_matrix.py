"""Rerun the bad-input and fault matrix of issue 10 and print one line per case, by group.

Usage (from the repository root)::

    PYTHONPATH=$PWD/src python tests/fault_matrix.py            # engine and CLI cases
    QT_API=pyqt6 xvfb-run -a env PYTHONPATH=$PWD/src python tests/fault_matrix.py --gui   # + napari

Each case is a test in ``tests/engine/test_matrix_*.py`` (and, with ``--gui``,
``tests/plugin/test_matrix_plugin.py``) named ``test_g<group>_...``; the exit
status is 0 only when every case holds.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GROUPS = {
    "1": "code execution from a received config",
    "2": "silent loss of results and inputs",
    "3": "resource exhaustion from tiny files",
    "4": "wrong results reported as ok",
    "5": "raw tracebacks and a stale status",
    "6": "interruptions",
    "plugin": "napari: pickled-model confirmation, singular affine in the reader",
}


class _Collect:
    """pytest plugin keeping the outcome of every test call."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.setdefault(report.nodeid, report.outcome)
            if report.outcome != "passed":
                self.outcomes[report.nodeid] = report.outcome


def _group(nodeid: str) -> str:
    name = nodeid.rsplit("::", 1)[-1]
    if name.startswith("test_g") and name[6:7].isdigit():
        return name[6]
    return "plugin"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gui", action="store_true", help="also the napari cases (needs an X server)")
    args = parser.parse_args(argv)
    paths = sorted(str(p) for p in (HERE / "engine").glob("test_matrix_*.py"))
    if args.gui:
        paths.append(str(HERE / "plugin" / "test_matrix_plugin.py"))
    collect = _Collect()
    pytest.main([*paths, "-q", "-p", "no:cacheprovider", "-W", "ignore", "--no-header", "-rN"],
                plugins=[collect])
    by_group: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for nodeid, outcome in collect.outcomes.items():
        by_group[_group(nodeid)].append((nodeid.rsplit("::", 1)[-1], outcome))
    print("\nfault matrix of issue 10")
    bad = 0
    for group, title in GROUPS.items():
        cases = by_group.get(group, [])
        if not cases:
            continue
        held = sum(outcome == "passed" for _, outcome in cases)
        bad += len(cases) - held
        print(f"\n{group}. {title}: {held} of {len(cases)} hold")
        for name, outcome in cases:
            print(f"   {'holds' if outcome == 'passed' else outcome.upper():<7} {name}")
    print(f"\n{'every case holds' if not bad and collect.outcomes else f'{bad} case(s) do not hold'}")
    return 0 if not bad and collect.outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
