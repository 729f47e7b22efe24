"""accuracy.png: the panels share one accuracy axis (no y-label over a neighbour) and the legend
names exactly the label budgets drawn, plus the baseline's dashed line when it is drawn."""

from __future__ import annotations

import pytest

from dalab.plots import accuracy_figure, budget_colors
from dalab.tables import build_table


def _recs(budgets_by_method, pairs=(("mnist5k", "ucidigits"), ("ucidigits", "mnist5k"))):
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    out = []
    for method, (family, budget) in budgets_by_method.items():
        for s, t in pairs:
            for seed in (0, 1):
                point = {"step": 1, "src_val": m(0.9), "tgt_val": m(0.6), "tgt_test": m(0.6 + 0.01 * seed),
                         "tgt_train_unsup": {}}
                out.append({"run_id": f"{method}__{s}-{t}__b{budget}__s{seed}", "status": "done",
                            "config": {"method": method, "source": s, "target": t, "seed": seed, "budget": budget,
                                       "hparams": {}, "backbone": "lenet", "steps": 1, "eval_every": 1},
                            "method": {"name": method, "family": family, "target_data": "unlabeled", "budget": budget},
                            "evals": [point], "train": {"steps": 1, "wall_time_s": 1.0, "steps_per_s": 1.0}})
    return out


@pytest.mark.parametrize("methods, legend", [
    ({"source_only": ("baseline", "0"), "dann": ("adversarial", "0")}, ["no target labels", "Source only"]),
    ({"dann": ("adversarial", "0")}, ["no target labels"]),  # no baseline row: no dashed line, no entry
    ({"source_only": ("baseline", "0"), "finetune": ("fine-tuning", "5"), "target_only": ("oracle", "all")},
     ["no target labels", "5 target labels per class", "all target labels", "Source only"]),
])
def test_one_axis_label_and_a_legend_of_what_is_drawn(methods, legend):
    import matplotlib.pyplot as plt

    fig, _ = accuracy_figure(build_table(_recs(methods), "last"))
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 2 and [bool(ax.get_ylabel()) for ax in panels] == [True, False]
        assert panels[0].get_shared_y_axes().joined(panels[0], panels[1])  # one scale for every pair
        assert [t.get_text() for t in fig.legends[0].get_texts()] == legend
        drawn = {tuple(round(c, 3) for c in bar.get_facecolor()) for ax in panels for bar in ax.patches}
        entries = {tuple(round(c, 3) for c in h.get_facecolor()) for h in fig.legends[0].legend_handles
                   if hasattr(h, "get_facecolor")}
        assert drawn == entries  # every colour drawn is named, and nothing else
    finally:
        plt.close(fig)


def test_each_budget_has_its_own_colour():
    c = budget_colors(["0", "1", "5", "all"])
    assert c["0"] == "tab:blue" and c["all"] == "tab:red" and len(set(c.values())) == 4
