"""The test suite's measured time, which the README states (generated, never typed).

    make test-timing      (= python -m dalab.benchmarks.suite_timing --out results/test_suite.json)

Runs the suite as `make test` does (``pytest -q --durations=15``, in this process) and, when every
test passed, writes how many passed, the wall time, the machine's cores, and the CPU other work used
meanwhile (in cores: the machine's busy time from /proc/stat less the suite's own) atomically to
``--out``; `make test-timing` then refreshes the README's generated block
(:func:`dalab.benchmarks.methods_table.suite_line`). A failing suite writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; None elsewhere)."""
    import os

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


class _Passed:
    """A pytest plugin counting the tests that passed."""

    def __init__(self) -> None:
        self.n = 0

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.passed:
            self.n += 1


def main(argv=None) -> int:
    import pytest

    from dalab.utils import atomic_write_json, machine_load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/test_suite.json")
    args = ap.parse_args(argv)
    counter = _Passed()
    busy0, own0, start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    code = pytest.main(["-q", "--durations=15", str(ROOT / "tests")], plugins=[counter])
    wall = time.perf_counter() - start
    busy1, own1 = _busy_cpu_s(), _own_cpu_s()
    # other work's average CPU use while the suite ran, in cores (the machine's busy time less the suite's)
    other = {} if busy0 is None or busy1 is None else {
        "other_cores": round(max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall, 1e-9), 2)}
    if code != 0 or counter.n == 0:
        print(f"error: the suite did not pass (pytest exit {int(code)}); {args.out} not written: fix the failures, "
              "then rerun `make test-timing`", file=sys.stderr)
        return 1
    atomic_write_json(args.out, {"passed": counter.n, "wall_s": round(wall, 1), **machine_load(), **other,
                                 "command": "make test-timing"})
    print(f"wrote {args.out}: {counter.n} tests passed in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
