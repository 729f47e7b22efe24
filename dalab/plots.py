"""Figures for papers, drawn from run records (matplotlib, Agg backend, PNG, atomic writes)."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def accuracy_bars(table: dict, path: str | Path) -> Path:
    """One panel per pair: a bar per method row (mean target-test accuracy) with the std over
    seeds as error bar; the table's selection rule is in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, rows = table["pairs"], table["rows"]
    labels = [r["method"] + ("" if r["budget"] == "0" else f" [{r['budget']}]") for r in rows]
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(4.0, 0.32 * len(rows)) * len(pairs), 4.2), squeeze=False)
    colors = {"0": "tab:blue", "all": "tab:red"}
    for ax, p in zip(axes[0], pairs):
        means = [statistics.mean(r["cells"][p]["accs"]) if r["cells"][p]["accs"] else 0.0 for r in rows]
        sds = [statistics.stdev(r["cells"][p]["accs"]) if len(r["cells"][p]["accs"]) > 1 else 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=sds, capsize=2,
               color=[colors.get(r["budget"], "tab:orange") for r in rows])
        base = next((m for r, m in zip(rows, means) if r["method"] == "source_only"), None)
        if base:
            ax.axhline(base, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=7)
        ax.set_title(p, fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("target test accuracy (%)")
    fig.suptitle(f"selection: {table['rule']} (blue: no target labels, orange: k/class, red: all; dashed: source only)",
                 fontsize=9)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def tsne_before_after(nets: dict, source, target, path: str | Path, n: int = 500, seed: int = 0,
                      title: str = "") -> Path:
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
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
