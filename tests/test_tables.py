"""Selection rules on hand-made records, and table formatting against golden files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dalab.tables import build_table, load_records, runs_csv, select, to_csv, to_latex, to_markdown, write_tables

GOLDEN = Path(__file__).parent / "golden"


def ev(step, src, tgt_val, tgt_test, im=0.0, ent=-1.0, snd=0.0):
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    return {"step": step, "src_val": m(src), "tgt_val": m(tgt_val), "tgt_test": m(tgt_test),
            "tgt_train_unsup": {"im": im, "entropy": ent, "snd": snd}}


def rec(method, family, budget, pair, seed, evals, status="done", hparams=None):
    s, t = pair
    return {"run_id": f"{method}__{s}-{t}__b{budget}__s{seed}", "status": status,
            "config": {"source": s, "target": t, "seed": seed, "hparams": hparams or {}, "backbone": "lenet",
                       "steps": evals[-1]["step"] if evals else 0},
            "method": {"name": method, "family": family, "target_data": "unlabeled", "budget": budget},
            "evals": evals, "train": {"steps": evals[-1]["step"] if evals else 0, "wall_time_s": 1.0, "steps_per_s": 10.0}}


# one run whose checkpoints disagree: every rule picks a different one
RUN = rec("dann", "adversarial", "0", ("a", "b"), 0, [
    ev(1, src=0.90, tgt_val=0.50, tgt_test=0.51, im=0.1, ent=-0.5, snd=3.0),
    ev(2, src=0.95, tgt_val=0.60, tgt_test=0.62, im=0.9, ent=-0.9, snd=1.0),
    ev(3, src=0.80, tgt_val=0.70, tgt_test=0.73, im=0.2, ent=-0.1, snd=2.0),
    ev(4, src=0.85, tgt_val=0.40, tgt_test=0.44, im=0.3, ent=-0.8, snd=2.5),
])


@pytest.mark.parametrize("rule,step", [("last", 4), ("src_val", 2), ("oracle", 3), ("im", 2),
                                       ("entropy", 3), ("snd", 1)])
def test_each_rule_picks_its_checkpoint(rule, step):
    assert select(RUN, rule)["step"] == step


def test_ties_go_to_the_later_checkpoint_and_diverged_runs_have_no_last():
    r = rec("m", "f", "0", ("a", "b"), 0, [ev(1, 0.9, 0.5, 0.5), ev(2, 0.9, 0.5, 0.6)])
    assert select(r, "src_val")["step"] == 2
    d = dict(r, status="diverged")
    assert select(d, "last") is None and select(d, "src_val")["step"] == 2


def test_trial_selection_uses_the_rule_not_the_test_set():
    # trial A: better source val, worse test; trial B: the reverse. src_val must pick A.
    a = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.99, 0.1, 0.10)], hparams={"lr": 0.1}) for s in (0, 1)]
    b = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.50, 0.9, 0.90)], hparams={"lr": 0.01}) for s in (0, 1)]
    cell = build_table(a + b, "src_val")["rows"][0]["cells"]["a→b"]
    assert cell["accs"] == [10.0, 10.0] and cell["hparams"] == {"lr": 0.1} and cell["n_trials"] == 2
    assert build_table(a + b, "oracle")["rows"][0]["cells"]["a→b"]["accs"] == [90.0, 90.0]


def golden_records():
    out = []
    for pair, base in ((("a", "b"), 0.60), (("b", "a"), 0.70)):
        for seed in (0, 1, 2):
            out.append(rec("source_only", "baseline", "0", pair, seed, [ev(1, 0.9, base, base + 0.01 * seed)]))
            out.append(rec("dann", "adversarial", "0", pair, seed, [ev(1, 0.9, base, base + 0.05 + 0.02 * seed)]))
            out.append(rec("finetune", "finetune", "5", pair, seed, [ev(1, 0.9, base, base + 0.2)]))
    out.append(rec("dann", "adversarial", "0", ("a", "b"), 3, [ev(1, 0.9, 0.1, 0.1)], status="diverged"))
    return out


@pytest.mark.parametrize("fmt", ["md", "tex", "csv"])
def test_table_matches_golden_file(fmt):
    t = build_table(golden_records(), "last")
    text = {"md": lambda: to_markdown(t, "GOLDEN"), "tex": lambda: to_latex(t, "GOLDEN"),
            "csv": lambda: to_csv([t])}[fmt]()
    golden = GOLDEN / f"table_last.{fmt}"
    if not golden.exists():
        golden.write_text(text)
        pytest.fail(f"golden file {golden} was missing and has been written: review it, commit it, re-run")
    assert text == golden.read_text()


def test_table_content():
    t = build_table(golden_records(), "last")
    rows = {r["method"]: r for r in t["rows"]}
    assert [r["method"] for r in t["rows"]] == ["source_only", "dann", "finetune"]  # budget 0 first, baseline first
    assert rows["dann"]["cells"]["a→b"]["n_failed"] == 1 and len(rows["dann"]["cells"]["a→b"]["accs"]) == 3
    assert rows["dann"]["mark"]["a→b"] == "best" and rows["source_only"]["mark"]["a→b"] == "second"
    assert rows["finetune"]["mark"]["a→b"] == "best"  # its own label-budget group
    assert rows["dann"]["rank"] == 1.0 and rows["source_only"]["rank"] == 2.0
    assert abs(rows["dann"]["avg"] - (67.0 + 77.0) / 2) < 1e-9


def test_write_tables_and_runs_csv(tmp_path):
    recs = golden_records()
    files = write_tables(recs, tmp_path / "out", ["last", "oracle"], "dalab table X")
    assert {f.name for f in files} == {"table.md", "table.tex", "table.csv", "runs.csv", "accuracy.png"}
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.startswith("<!-- generated by: dalab table X -->") and "ORACLE" in md
    lines = runs_csv(recs, ["last"]).splitlines()
    assert len(lines) == 1 + len(recs) and "last_tgt_test_acc" in lines[0]


def test_load_records_ignores_partial_runs(tmp_path):
    for name, done in (("a", True), ("b", False)):
        d = tmp_path / name
        d.mkdir()
        (d / "record.json").write_text(json.dumps(RUN))
        if done:
            (d / "done").write_text("done\n")
    (tmp_path / "c").mkdir()
    assert len(load_records(tmp_path)) == 1


def test_different_settings_are_never_pooled():
    a = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.9, 0.5, 0.50)]) for s in (0, 1)]
    b = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.9, 0.5, 0.90), ev(2, 0.9, 0.5, 0.90)]) for s in (0, 1)]
    rows = build_table(a + b, "last")["rows"]
    assert sorted(r["method"] for r in rows) == ["m (lenet, 1 steps)", "m (lenet, 2 steps)"]
    assert sorted(r["cells"]["a→b"]["accs"][0] for r in rows) == [50.0, 90.0]
