"""Figures for papers, drawn from run records (matplotlib, Agg backend, PNG/PDF, atomic writes; each
file carries what it shows and the command that made it in its metadata). Names from dalab.display."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path


def _save(fig, path: Path, what: str = "", command: str = "") -> Path:
    """Write ``fig`` atomically (format from the suffix: .png or .pdf), with what it shows and the
    command that made it in the file's metadata (read back by dalab.results_index)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or "png"
    meta = ({"Title": what, "Description": what, "Software": command} if fmt == "png"
            else {"Title": what, "Subject": what, "Creator": command} if fmt == "pdf" else None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{fmt}", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt,
                    metadata={k: v for k, v in (meta or {}).items() if v} or None)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _save_both(fig, stem: Path, what: str, command: str) -> list[Path]:
    """PNG and PDF of one figure."""
    return [_save(fig, stem.with_suffix(".png"), what, command), _save(fig, stem.with_suffix(".pdf"), what, command)]


def budget_colors(budgets) -> dict[str, str]:
    """One colour per label budget present: no target labels blue, all labels red, each k/class its own."""
    ks = iter(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
    return {b: "tab:blue" if b == "0" else "tab:red" if b == "all" else next(ks) for b in budgets}


def accuracy_bars(table: dict, path: str | Path, command: str = "") -> Path:
    """The figure of :func:`accuracy_figure`, written to ``path``."""
    import matplotlib.pyplot as plt

    fig, what = accuracy_figure(table)
    out = _save(fig, Path(path), what, command)
    plt.close(fig)
    return out


def accuracy_figure(table: dict):
    """(figure, what it shows): one panel per pair, a bar per method row (mean target-test
    accuracy) with the std over seeds as error bar, coloured by label budget; the panels share the
    accuracy axis (one label, on the left) and the legend names only the budgets drawn (and the
    baseline's dashed line when it is drawn); the table's selection rule is in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from dalab import display
    from dalab.selection import RULES

    from dalab.tasks import metric_names

    metric = metric_names(table.get("label_sets", ["closed"]))[1]
    split = "online" if table.get("split") == "online" else "target test"  # dalab.tasks.SPLIT_NAMES, short
    pairs, rows = table["pairs"], table["rows"]
    labels = [r["display"] + ("" if r["budget"] == "0" else f" [{r['budget']}]") for r in rows]
    colors = budget_colors(dict.fromkeys(r["budget"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(3.0, 0.32 * len(rows)) * len(pairs) + 0.8, 4.2),
                             squeeze=False, sharey=True)
    baseline_drawn = False
    for i, (ax, p) in enumerate(zip(axes[0], pairs)):
        means = [statistics.mean(r["cells"][p]["accs"]) if r["cells"][p]["accs"] else 0.0 for r in rows]
        sds = [statistics.stdev(r["cells"][p]["accs"]) if len(r["cells"][p]["accs"]) > 1 else 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=sds, capsize=2, color=[colors[r["budget"]] for r in rows])
        base = next((m for r, m in zip(rows, means) if r.get("is_baseline")), None)
        if base:
            ax.axhline(base, color="gray", lw=0.8, ls="--")
            baseline_drawn = True
        ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=7)
        title = display.pair_key(p)  # a multi-source task's long name: the target on a line of its own
        ax.set_title(title.replace(" → ", "\n→ ") if len(title) > 32 else title, fontsize=9)
        ax.set_ylim(0, 100)
        if i == 0:  # shared axis: one label, left of the first panel only
            ax.set_ylabel(f"{split} {metric} (%)")
    handles = [Patch(color=c, label=display.budget(b)) for b, c in colors.items()]
    if baseline_drawn:
        handles.append(Line2D([], [], color="gray", lw=0.8, ls="--", label=table.get("baseline_display", "Source only")))
    rule = RULES[table["rule"]]
    what = (f"{split[:1].upper()}{split[1:]} {metric} per pair and method, mean and std over seeds; selection: {rule.label}")
    fig.suptitle(f"selection: {rule.label}", fontsize=9, y=1.01)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.9), ncol=len(handles), fontsize=8,
               frameon=False)
    two_lines = any(len(display.pair_key(p)) > 32 for p in pairs)  # titles of two lines need the room
    fig.subplots_adjust(top=0.78 if two_lines else 0.84, wspace=0.08)
    return fig, what


def cd_diagram(table: dict, stem: str | Path, command: str = "") -> list[Path]:
    """Critical-difference diagram (Demšar, JMLR 2006) of a table's Friedman + Nemenyi result
    (dalab.stats): mean rank of each method without target labels over the pairs (the blocks);
    methods joined by a bar are not significantly different (Nemenyi, alpha 0.05). Drawn by
    scikit-posthocs; written as PNG and PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs as sp

    from dalab.selection import RULES

    fr = table["friedman"]
    rule = RULES[table["rule"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.22 * fr["n_methods"]))
    sp.critical_difference_diagram(fr["ranks"], fr["nemenyi"], ax=ax, alpha=fr["alpha"],
                                   label_props={"fontsize": 8})
    what = (f"Critical-difference diagram, selection rule {rule.label}: mean rank (1 = best) of "
            f"{fr['n_methods']} methods without target labels over {fr['n_blocks']} pairs (blocks); "
            f"Friedman chi2 = {fr['statistic']:.2f}, p = {fr['p']:.3g}; bars join methods the Nemenyi "
            f"post-hoc test does not separate (alpha {fr['alpha']})")
    ax.set_title(f"selection: {rule.label}. Mean rank over {fr['n_blocks']} pairs (blocks), {fr['n_methods']} "
                 f"methods; Friedman χ² = {fr['statistic']:.1f}, p = {fr['p']:.3g};\nbars: not separated by "
                 f"Nemenyi post-hoc (α = {fr['alpha']}); few blocks give little power", fontsize=8)
    out = _save_both(fig, Path(stem), what, command)
    plt.close(fig)
    return out


def budget_curve(records: list[dict], stem: str | Path, rule: str = "last", baseline: str = "source_only",
                 command: str = "") -> list[Path]:
    """Target accuracy vs target labels per class (0, 1, 5, ..., all), one panel per pair, one line
    per method (mean ± std over seeds under ``rule``); methods without target labels appear at 0,
    the baseline as a dashed line. Written as PNG and PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalab import display
    from dalab.display import pair_name
    from dalab.selection import RULES, select
    from dalab.tasks import score

    by: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in records:
        p = select(r, rule)
        if p is not None:
            by.setdefault(pair_name(r), {}).setdefault(r["method"]["name"], {}).setdefault(
                r["method"]["budget"], []).append(score(r, p) * 100)
    budgets = sorted({b for m in by.values() for bs in m.values() for b in bs},
                     key=lambda b: (b == "all", int(b) if b.isdigit() else 0))
    x = {b: i for i, b in enumerate(budgets)}
    pairs = sorted(by)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.8), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for m, bs in sorted(by[pair].items(), key=lambda kv: (kv[0] != baseline, kv[0])):
            keys = sorted(bs, key=lambda b: x[b])
            mean = [statistics.mean(bs[b]) for b in keys]
            sd = [statistics.stdev(bs[b]) if len(bs[b]) > 1 else 0.0 for b in keys]
            if m == baseline and keys == ["0"]:
                ax.axhline(mean[0], color="gray", ls="--", lw=1, label=display.method(m))
                continue
            ax.errorbar([x[b] for b in keys], mean, yerr=sd, marker="o" if len(keys) > 1 else "s", capsize=3,
                        label=display.method(m), lw=1.2, ms=4)
        ax.set_xticks(range(len(budgets)), [b for b in budgets])
        ax.set_xlabel("target labels per class")
        ax.set_ylabel("target test accuracy (%)")
        ax.set_title(display.pair_key(pair), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    what = (f"Label-budget curve: target test accuracy vs target labels per class ({', '.join(budgets)}), "
            f"mean and std over seeds, selection {RULES[rule].label}")
    from dalab.display import setting
    settings = sorted({setting(r) for r in records})
    fig.suptitle(f"selection: {RULES[rule].label}; mean ± std over {len({r['config']['seed'] for r in records})} seeds"
                 + (f"; {settings[0]}" if len(settings) == 1 else ""), fontsize=9)
    out = _save_both(fig, Path(stem), what, command)
    plt.close(fig)
    return out


def tsne_before_after(nets: dict, source, target, path: str | Path, n: int = 500, seed: int = 0,
                      title: str = "", command: str = "") -> Path:
    """t-SNE (scikit-learn) of backbone features of ``n`` source and ``n`` target test images, one
    panel per network (e.g. {"source only": net0, "DANN": net1}); colour = class, marker = domain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(seed)
    picks = []
    for split in (source, target):
        idx = torch.randperm(len(split), generator=g)[:n].to(split.device)
        picks.append((split.to_input(split.images[idx]), split.labels[idx].cpu().numpy()))
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 4.8), squeeze=False)
    for ax, (label, net) in zip(axes[0], nets.items()):
        net.eval()
        with torch.no_grad():
            feats = [net.backbone(x).float().cpu().numpy() for x, _ in picks]
        import numpy as np
        emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(np.concatenate(feats))
        ns = len(feats[0])
        for (lo, hi), marker, name in (((0, ns), "o", "source"), ((ns, len(emb)), "x", "target")):
            y = picks[0][1] if name == "source" else picks[1][1]
            ax.scatter(emb[lo:hi, 0], emb[lo:hi, 1], c=y, cmap="tab10", s=7, marker=marker, alpha=0.7,
                       vmin=0, vmax=9, label=name, linewidths=0.6)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=8, markerscale=2)
    if title:
        fig.suptitle(title, fontsize=10)
    out = _save(fig, Path(path), "t-SNE of backbone features of source (o) and target (x) test images, colour = class, "
                "before and after adaptation" + (f": {title}" if title else ""), command)
    plt.close(fig)
    return out
