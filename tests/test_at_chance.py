"""A run whose source accuracy stays at chance is marked in the tables and named by the bench."""

from __future__ import annotations

from dalab.selection import CHANCE_MARK, at_chance
from dalab.tables import build_table, to_latex, to_markdown


def _rec(method, seed, src_acc, tgt_acc, status="done", classes=10):
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    point = {"step": 10, "src_val": m(src_acc), "tgt_val": m(tgt_acc), "tgt_test": m(tgt_acc),
             "tgt_train_unsup": {"im": 0.0, "entropy": -1.0, "snd": 0.0}}
    return {"run_id": f"{method}__a-b__b0__s{seed}", "status": status,
            "config": {"method": method, "source": "syndigits", "target": "mnist5k", "seed": seed, "budget": "0",
                       "hparams": {}, "backbone": "lenet", "steps": 10, "eval_every": 10, "pretrained": None,
                       "split_seed": 0, "precision": "auto"},
            "method": {"name": method, "family": "baseline" if method == "source_only" else "adversarial",
                       "target_data": "unlabeled", "budget": "0"},
            "data": {"source": {"classes": classes}, "target": {"classes": classes}},
            "evals": [point], "final": point,
            "train": {"steps": 10, "wall_time_s": 1.0, "steps_per_s": 10.0}}


def test_at_chance_is_final_source_accuracy_near_one_over_classes():
    assert at_chance(_rec("source_only", 0, 0.096, 0.1))
    assert at_chance(_rec("source_only", 0, 0.149, 0.1)) and not at_chance(_rec("source_only", 0, 0.16, 0.1))
    assert not at_chance(_rec("source_only", 0, 0.9, 0.6))
    assert not at_chance(_rec("source_only", 0, 0.1, 0.1, status="diverged"))  # marked † instead
    assert at_chance(_rec("source_only", 0, 0.52, 0.5, classes=2)) and not at_chance(_rec("x", 0, 0.6, 0.5, classes=2))
    # a target-only run never saw a source image: its source accuracy is not a failure to learn
    assert not at_chance(_rec("target_only", 0, 0.1, 0.9))
    rec = _rec("source_only", 0, 0.1, 0.1)
    del rec["data"]
    assert not at_chance(rec)  # a record that does not say how many classes: never flagged


def test_a_cell_with_runs_at_chance_is_marked_and_the_mark_explained():
    recs = [_rec("source_only", s, 0.096, 0.1) for s in (0, 1)] + [_rec("source_only", 2, 0.95, 0.6)]
    recs += [_rec("dann", s, 0.95, 0.7) for s in (0, 1, 2)]
    t = build_table(recs, "last")
    md = to_markdown(t)
    src_row = next(ln for ln in md.splitlines() if ln.startswith("| Source only"))
    dann_row = next(ln for ln in md.splitlines() if ln.startswith("| DANN"))
    assert f"{CHANCE_MARK}2" in src_row and CHANCE_MARK not in dann_row
    assert "at chance" in md and "26.7" in src_row  # kept in the mean: (10 + 10 + 60) / 3
    assert r"$^\circ$2" in to_latex(t)
    assert "at chance" not in to_markdown(build_table([r for r in recs if r["method"] == "dann"], "last"))
