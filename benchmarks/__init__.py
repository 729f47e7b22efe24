"""Benchmark scripts and specs (run them with ``python -m dalab.benchmarks.<name>``)."""


def report_main(argv, doc: str, module: str, runs: str, out: str, render) -> int:
    """The command line of a report module that reads one folder of run records:
    ``python -m <module> [RUNS] [--out OUT]``; ``render(runs, command)`` gives the page, written
    atomically, its first line naming the command that regenerates it (``make tables`` runs it)."""
    import argparse

    from dalab.utils import atomic_write_text

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("runs", nargs="?", default=runs, help=f"folder of run records (default {runs})")
    p.add_argument("--out", default=out, help=f"the page to write (default {out})")
    a = p.parse_args(argv)
    atomic_write_text(a.out, render(a.runs, f"python -m {module} {a.runs} --out {a.out}"))
    print(f"wrote {a.out}")
    return 0
