"""The generated blocks of README.md and docs/ (methods, hyperparameters, data options, selection
rules, the main job's counts and measured time), from the registries and the results.

    python -m dalab.benchmarks.methods_table           print the methods and data-option tables (= dalab list --markdown)
    python -m dalab.benchmarks.methods_table --write   rewrite every block in README.md and docs/ (FILES)

Each block sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; tests/test_readme.py
fails when a block differs from what the registries give, or when a typed count reappears.
"""

from __future__ import annotations

from pathlib import Path

from dalab.methods import METHODS

BUDGET_TEXT = {"0": "0", "k": "k/class", "all": "all"}


def paper_link(paper: str) -> str:
    """'Authors, Title, Venue. URL' -> '[Authors, Venue](URL)'; plain text when there is no URL."""
    if ". http" not in paper:
        return paper
    text, url = paper.rsplit(". http", 1)
    parts = [p.strip() for p in text.split(", ")]
    short = f"{parts[0]}, {parts[-1]}" if len(parts) > 2 else text
    return f"[{short}](http{url})"


def check_link(name: str) -> str:
    """Where a method's update is checked: its row (anchor) in results/peer_equivalence.md --
    "pytorch-adapt" when compared step by step with the library's adapter or hooks, "by hand"
    when checked against hand computations (no counterpart in the library), "parts by hand" when
    its entry says what is "not yet" checked, "not yet" otherwise."""
    from dalab.benchmarks.peer_equivalence import CASES, HAND_CHECKED

    text = ("pytorch-adapt" if any(c.method == name for c in CASES) else
            "not yet" if name not in HAND_CHECKED else
            "parts by hand" if "not yet" in HAND_CHECKED[name] else "by hand")
    return f"[{text}](results/peer_equivalence.md#{name})"


def settings_text(cls) -> str:
    """The label-set settings a method runs on: "all" for a closed-set method (on open-set and
    universal tasks behind the rejection baseline), else the list."""
    from dalab.tasks import SETTINGS

    return "all" if set(cls.settings) == set(SETTINGS) else ", ".join(cls.settings)


def markdown() -> str:
    rows = ["| name | family | target data | label budgets | settings | starts from | update checked | paper |",
            "|---|---|---|---|---|---|---|---|"]
    for name, cls in sorted(METHODS.items(), key=lambda kv: (kv[1].family, kv[0])):
        budgets = ", ".join(BUDGET_TEXT[b] for b in cls.label_budgets)
        start = "source_only run" if cls.init_from_source else "scratch"
        rows.append(f"| `{name}` | {cls.family} | {cls.target_data.value} | {budgets} | {settings_text(cls)} | "
                    f"{start} | {check_link(name)} | {paper_link(cls.paper)} |")
    return "\n".join(rows)


def data_options_markdown() -> str:
    """The data options every method accepts (``--set NAME=VALUE``, or a spec's ``hparams``/``variants``)."""
    from dalab.methods.base import DATA_HPARAMS

    rows = ["| option | default | values | what it does |", "|---|---|---|---|"]
    for name, h in DATA_HPARAMS.items():
        values = ", ".join(map(str, h.choices)) if h.choices else f">= {h.low:g}" if h.low is not None else "any"
        rows.append(f"| `{name}` | `{h.default}` | {values} | {h.help} |")
    return "\n".join(rows)


def space_text(h) -> str:
    """A hyperparameter's search space in words: ``log [0.001, 0.1]``, ``sgd, adam``, ``not searched``."""
    return (", ".join(map(str, h.space[1])) if h.space and h.space[0] == "choice"
            else f"{h.space[0]} [{h.space[1]:g}, {h.space[2]:g}]" if h.space
            else "not searched (" + ", ".join(map(str, h.choices)) + ")" if h.choices else "not searched")


def shared_hparams_markdown() -> str:
    """The shared hyperparameters every method has (optimizer, schedule, batch, BatchNorm handling)."""
    from dalab.methods.base import DATA_HPARAMS, SHARED_HPARAMS

    rows = ["| hyperparameter | default | search space | what it is |", "|---|---|---|---|"]
    for name, h in SHARED_HPARAMS.items():
        if name in DATA_HPARAMS:
            continue
        rows.append(f"| `{name}` | `{h.default}` | {space_text(h)} | {h.help} |")
    return "\n".join(rows)


def selection_rules_markdown() -> str:
    from dalab.selection import markdown as rules_markdown
    return rules_markdown()


ROOT = Path(__file__).resolve().parent.parent  # the repository (benchmarks/ sits at its top)
MAIN_SPEC = "digits.yaml"


def _load_note(t: dict) -> str:
    """What a timing.json says about the machine's load at the grid's end, when other work shared it."""
    load, cores = t.get("load_avg_15min"), t.get("cpu_cores")
    if load is None or cores is None:
        return " (the machine's load was not recorded)"
    return f" (15-minute load average {load:.1f} on {cores} cores: other work shared them)" if load > cores + 0.5 else ""


def counts_markdown() -> str:
    """The counts and measured times the README states: from the registry, the main spec's grid and
    the main job's results/digits/timing.json (written by `dalab bench` at the end of a grid)."""
    import json

    from dalab.bench import BenchSpec, expand, resolve_methods

    spec = BenchSpec.from_yaml(Path(__file__).resolve().parent / MAIN_SPEC)
    grid = expand(spec)
    n_pairs = len({(c.source, c.target) for c, _ in grid})
    lines = [f"`make bench` runs `dalab bench benchmarks/{MAIN_SPEC} --jobs 2`: every registered closed-set method "
             f"({len(resolve_methods(spec))}) x its label budgets x {n_pairs} offline digits pairs x {len(spec.seeds)} seeds = "
             f"**{len(grid)} runs** of {spec.steps} steps ({spec.backbone}, evaluated every {spec.eval_every} "
             f"steps), then the t-SNE figure and the results index."]
    timing = ROOT / "results" / "digits" / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        total = max(t["wall_s"] * t["workers"], 1e-9)
        lines.append(f"Last measured (`results/digits/timing.json`, `{t.get('command', '?')}`): {t['runs']} runs "
                     f"trained in {t['wall_s']:.0f} s ({t['wall_s'] / 60:.0f} min) by {t['workers']} workers; "
                     f"training {100 * t['train_s'] / total:.0f} %, evaluation {100 * t['eval_s'] / total:.0f} % "
                     f"of their time; grid efficiency {t['efficiency']:.2f}" + _load_note(t) + ".")
    suite = ROOT / "results" / "test_suite.json"
    if suite.is_file():
        lines.append(suite_line(json.loads(suite.read_text())))
    return "\n".join(lines)


def suite_line(t: dict) -> str:
    """The README's sentence on the test suite, from results/test_suite.json (`make test-timing`)."""
    cores = f" on {t['cpu_cores']} cores" if t.get("cpu_cores") else ""
    other = t.get("other_cores")
    note = (" (other work's CPU use meanwhile was not recorded)" if other is None else
            f" (other work used {other:.1f} cores meanwhile)" if other >= 0.25 else "")
    return (f"`make test`, last measured (`results/test_suite.json`, `{t.get('command', '?')}`): {t['passed']} tests "
            f"passed in {t['wall_s']:.0f} s ({t['wall_s'] / 60:.1f} min){cores}{note}.")


HARD_SPEC = "digits_hard.yaml"


def _averages(spec_name: str) -> tuple[dict[str, float], int, str]:
    """(method -> target-test accuracy (%) averaged over the spec's pairs of the seed means, for the
    budget-0 runs of methods with every pair finished; number of pairs; the rule) of a spec's committed
    records at the checkpoint its first selection rule picks."""
    import statistics

    from dalab.bench import BenchSpec, expand, grid_records
    from dalab.selection import select
    from dalab.tasks import score

    spec = BenchSpec.from_yaml(Path(__file__).resolve().parent / spec_name)
    spec.runs_dir = str(ROOT / spec.runs_dir)
    grid = expand(spec)
    pairs = {(c.source, c.target) for c, _ in grid}
    rule = spec.selection[0]
    cells: dict[tuple[str, tuple], list[float]] = {}
    for r in grid_records(spec, grid):
        c, p = r["config"], select(r, rule)
        if c.get("budget", "0") in ("0", 0) and p is not None:
            cells.setdefault((r["method"]["name"], (c["source"], c["target"])), []).append(100 * score(r, p))
    out = {}
    for m in {m for m, _ in cells}:
        if all((m, pair) in cells for pair in pairs):
            out[m] = statistics.mean(statistics.mean(cells[(m, pair)]) for pair in pairs)
    return out, len(pairs), rule


def headline_markdown() -> str:
    """The README's headline: every unsupervised method's average on the main table's moderate shifts and on the
    hard shifts (benchmarks/digits_hard.yaml), from the committed records, never typed."""
    from dalab import display

    main, n_main, rule = _averages(MAIN_SPEC)
    hard, n_hard, _ = _averages(HARD_SPEC)
    lines = [f"Target test accuracy (%), average over the pairs of the mean over 3 seeds, checkpoint `{rule}` (no target "
             f"labels), budget 0; from the committed records of `benchmarks/{MAIN_SPEC}` ({n_main} moderate shifts: "
             f"source-only {main.get('source_only', float('nan')):.1f}) and `benchmarks/{HARD_SPEC}` ({n_hard} hard "
             f"shifts, source model near chance: source-only "
             + (f"{hard['source_only']:.1f}" if "source_only" in hard else "not run yet")
             + "; why methods fall below it: `results/digits_hard/report.md`).", "",
             "| method | main | Δ main | hard | Δ hard |", "|---|---|---|---|---|"]

    def delta(table: dict, m: str) -> str:
        return f"{table[m] - table['source_only']:+.1f}" if m in table and "source_only" in table and m != "source_only" else ""

    for m in sorted(main, key=lambda m: -main[m]):
        h = f"{hard[m]:.1f}" if m in hard else "—"
        lines.append(f"| {display.method(m)} | {main[m]:.1f} | {delta(main, m)} | {h} | {delta(hard, m)} |")
    from dalab.benchmarks.long_report import average_tau

    complete, taus, done, total = average_tau()
    agree = ", ".join(f"{tau:.2f} under `{r}`" for r, tau in taus.items()) or "not measured yet (fewer than 3 methods)"
    finished = done == total
    status = f"all {total} runs" if finished else f"{done} of {total} runs finished, `make bench-long` continues"
    methods = f"the {len(complete)} methods" + ("" if finished else " finished there")
    lines += ["", f"Long budget (`results/digits_long/`, 2000 steps, the still-moving methods; {status}): Kendall's τ "
                  f"between the 500- and the 2000-step rankings of {methods}: {agree} "
                  f"(`results/digits_long/agreement.md`)."]
    return "\n".join(lines)


SETTING_SPECS = ("digits_partial.yaml", "digits_openset.yaml", "digits_universal.yaml", "digits_tta.yaml",
                 "digits_tta_continual.yaml", "digits_multisource.yaml", "digits_dg.yaml")


def settings_markdown() -> str:
    """The README's settings table: per setting (label-set, test-time), its spec, split, headline metric, methods,
    grid size and the measured time of its last `dalab bench` (the spec's timing.json), if any."""
    import json

    from dalab.bench import BenchSpec, expand, resolve_methods
    from dalab.methods import METHODS
    from dalab.tasks import HEADLINE, label_set

    lines = ["| setting | spec | classes (shared:source-private:target-private) | headline metric | methods | runs "
             "| last measured |", "|---|---|---|---|---|---|---|"]
    for name in SETTING_SPECS:
        spec = BenchSpec.from_yaml(Path(__file__).resolve().parent / name)
        ls = label_set(spec.setting, spec.classes)
        methods = resolve_methods(spec)
        own = [f"**{m}**" if "closed" not in METHODS[m].settings else m for m in methods]
        tta = any(METHODS[m].test_time for m in methods)
        dg = any(METHODS[m].domain_generalization for m in methods)
        several = f"leave-one-domain-out, {len(spec.leave_one_out) - 1} sources" if spec.leave_one_out else ""
        setting = (f"test-time ({spec.setting})" if tta else f"domain generalization ({several})" if dg
                   else f"multi-source ({several})" if several else spec.setting)
        metric = f"online {HEADLINE[spec.setting][1]} (each batch predicted before adapting on it)" if tta \
            else HEADLINE[spec.setting][1]
        timing = ROOT / spec.out / "timing.json"
        took = "not run yet"
        if timing.is_file():
            t = json.loads(timing.read_text())
            plural = "" if t["workers"] == 1 else "s"
            took = f"{t['runs']} runs in {t['wall_s'] / 60:.0f} min, {t['workers']} worker{plural}{_load_note(t)}"
        classes = f"`{ls.text()}`" if ls else "all"
        lines.append(f"| {setting} | `benchmarks/{name}` | {classes} | {metric} | "
                     f"{', '.join(own)} | {len(expand(spec))} | {took} |")
    return "\n".join(lines)


BLOCKS = {"settings": settings_markdown, "methods": markdown, "shared-hparams": shared_hparams_markdown,
          "data-options": data_options_markdown, "selection-rules": selection_rules_markdown, "counts": counts_markdown,
          "headline": headline_markdown}
# where each generated block lives (paths relative to the repository)
FILES = {"README.md": ("counts", "headline", "settings", "methods"), "docs/methods.md": ("shared-hparams", "data-options"),
         "docs/benchmarks.md": ("selection-rules",)}


def readme_blocks(text: str) -> dict[str, str]:
    """The generated blocks of a README text, by name (content between the markers, stripped)."""
    import re

    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"<!-- generated: ([\w-]+) -->\n(.*?)<!-- end: \1 -->", text, re.S)}


def rewrite_readme(text: str, names=None) -> str:
    """``text`` with each generated block of ``names`` (default: all) replaced by its current table."""
    for name in names or BLOCKS:
        start, end = f"<!-- generated: {name} -->\n", f"<!-- end: {name} -->"
        if start not in text or end not in text:
            raise SystemExit(f"error: no block {start.strip()} ... {end}; add the two markers")
        head, rest = text.split(start, 1)
        text = head + start + BLOCKS[name]() + "\n" + end + rest.split(end, 1)[1]
    return text


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv[1:]:
        from dalab.utils import atomic_write_text

        for rel, names in FILES.items():
            atomic_write_text(ROOT / rel, rewrite_readme((ROOT / rel).read_text(), names))
            print(f"rewrote the generated blocks of {rel}")
    else:
        print(markdown())
        print()
        print(data_options_markdown())
