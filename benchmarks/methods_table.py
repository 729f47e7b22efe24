"""The README's methods table, generated from the registry.

    python -m dalab.benchmarks.methods_table        (same as: dalab list --markdown)
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


def markdown() -> str:
    rows = ["| name | family | target data | label budgets | starts from | paper |", "|---|---|---|---|---|---|"]
    for name, cls in sorted(METHODS.items(), key=lambda kv: (kv[1].family, kv[0])):
        budgets = ", ".join(BUDGET_TEXT[b] for b in cls.label_budgets)
        start = "source_only run" if cls.init_from_source else "scratch"
        rows.append(f"| `{name}` | {cls.family} | {cls.target_data.value} | {budgets} | {start} | "
                    f"{paper_link(cls.paper)} |")
    return "\n".join(rows)


def data_options_markdown() -> str:
    """The data options every method accepts (``--set NAME=VALUE``, or a spec's ``hparams``/``variants``)."""
    from dalab.methods.base import DATA_HPARAMS

    rows = ["| option | default | values | what it does |", "|---|---|---|---|"]
    for name, h in DATA_HPARAMS.items():
        values = ", ".join(map(str, h.choices)) if h.choices else f">= {h.low:g}" if h.low is not None else "any"
        rows.append(f"| `{name}` | `{h.default}` | {values} | {h.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
    print()
    print(data_options_markdown())
