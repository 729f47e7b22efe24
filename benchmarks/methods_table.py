"""The README's generated tables (methods, data options), from the registries.

    python -m dalab.benchmarks.methods_table           print them (same as: dalab list --markdown)
    python -m dalab.benchmarks.methods_table --write   rewrite their blocks in README.md

In README.md each table sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``;
tests/test_readme.py fails when a block differs from what the registries give.
"""

from __future__ import annotations

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
    when checked against hand computations (no counterpart in the library), "not yet" otherwise."""
    from dalab.benchmarks.peer_equivalence import CASES, HAND_CHECKED

    text = ("pytorch-adapt" if any(c.method == name for c in CASES) else
            "by hand" if name in HAND_CHECKED else "not yet")
    return f"[{text}](results/peer_equivalence.md#{name})"


def markdown() -> str:
    rows = ["| name | family | target data | label budgets | starts from | update checked | paper |",
            "|---|---|---|---|---|---|---|"]
    for name, cls in sorted(METHODS.items(), key=lambda kv: (kv[1].family, kv[0])):
        budgets = ", ".join(BUDGET_TEXT[b] for b in cls.label_budgets)
        start = "source_only run" if cls.init_from_source else "scratch"
        rows.append(f"| `{name}` | {cls.family} | {cls.target_data.value} | {budgets} | {start} | "
                    f"{check_link(name)} | {paper_link(cls.paper)} |")
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


BLOCKS = {"methods": markdown, "shared-hparams": shared_hparams_markdown, "data-options": data_options_markdown,
          "selection-rules": selection_rules_markdown}


def readme_blocks(text: str) -> dict[str, str]:
    """The generated blocks of a README text, by name (content between the markers, stripped)."""
    import re

    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"<!-- generated: ([\w-]+) -->\n(.*?)<!-- end: \1 -->", text, re.S)}


def rewrite_readme(text: str) -> str:
    """``text`` with every generated block replaced by the registries' current table."""
    for name, make in BLOCKS.items():
        start, end = f"<!-- generated: {name} -->\n", f"<!-- end: {name} -->"
        if start not in text or end not in text:
            raise SystemExit(f"error: README has no block {start.strip()} ... {end}; add the two markers")
        head, rest = text.split(start, 1)
        text = head + start + make() + "\n" + end + rest.split(end, 1)[1]
    return text


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if "--write" in sys.argv[1:]:
        from dalab.utils import atomic_write_text

        readme = Path(__file__).resolve().parent.parent / "README.md"
        atomic_write_text(readme, rewrite_readme(readme.read_text()))
        print(f"rewrote the generated blocks of {readme}")
    else:
        print(markdown())
        print()
        print(data_options_markdown())
