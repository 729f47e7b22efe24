"""Selection rules on hand-made records, and table formatting against golden files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dalab.tables import RowGroup, build_table, caption, load_records, runs_csv, select, to_csv, to_latex, to_markdown, write_tables

GOLDEN = Path(__file__).parent / "golden"


def ev(step, src, tgt_val, tgt_test, im=0.0, ent=-1.0, snd=0.0):
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    return {"step": step, "src_val": m(src), "tgt_val": m(tgt_val), "tgt_test": m(tgt_test),
            "tgt_train_unsup": {"im": im, "entropy": ent, "snd": snd}}


def rec(method, family, budget, pair, seed, evals, status="done", hparams=None):
    s, t = pair
    return {"run_id": f"{method}__{s}-{t}__b{budget}__s{seed}", "status": status,
            "config": {"method": method, "source": s, "target": t, "seed": seed, "budget": budget,
                       "hparams": hparams or {}, "backbone": "lenet", "steps": evals[-1]["step"] if evals else 0,
                       "eval_every": 1, "pretrained": None, "split_seed": 0, "precision": "auto"},
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


def test_ties_go_to_the_later_checkpoint_and_diverged_runs_have_no_checkpoint():
    r = rec("m", "f", "0", ("a", "b"), 0, [ev(1, 0.9, 0.5, 0.5), ev(2, 0.9, 0.5, 0.6)])
    assert select(r, "src_val")["step"] == 2
    d = dict(r, status="diverged")
    # a diverged run is marked under EVERY rule (issue 15): no rule picks one of its checkpoints
    assert all(select(d, rule) is None for rule in ("last", "src_val", "oracle", "im", "entropy", "snd"))


def _trial_pair():
    # trial A: better source val, worse test; trial B: the reverse
    a = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.99, 0.1, 0.10)], hparams={"lr": 0.1}) for s in (0, 1)]
    b = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.50, 0.9, 0.90)], hparams={"lr": 0.01}) for s in (0, 1)]
    for r in b:
        r["run_id"] += "_b"
    return a, b


def test_trial_selection_uses_the_rule_not_the_test_set():
    # a declared search (a spec's trials:) pools its trials; src_val must pick A
    a, b = _trial_pair()
    search = {r["run_id"]: RowGroup(search="m lr") for r in a + b}
    t = build_table(a + b, "src_val", groups=search)
    (row,) = t["rows"]
    cell = row["cells"]["a→b"]
    assert cell["accs"] == [10.0, 10.0] and cell["hparams"] == {"lr": 0.1} and cell["n_trials"] == 2
    assert row["display"] == "m (best of 2 trials by src_val)"
    assert build_table(a + b, "oracle", groups=search)["rows"][0]["cells"]["a→b"]["accs"] == [90.0, 90.0]
    assert "m (best of 2 trials by src_val)" in to_markdown(t) and '{""hparams"": {""lr"": 0.1}' in to_csv([t])


def test_settings_are_rows_and_adding_one_never_changes_another():
    """Issue 27's scenario: DANN at trade-off 1.0 in a runs folder, then DANN at 0.1 added to the
    same folder. Without a declared search they are two rows, each with its own numbers, named by
    what differs; the first row's numbers are the same before and after."""
    one = [rec("dann", "adversarial", "0", p, s, [ev(1, 0.9, 0.5, 0.60 + 0.01 * s + 0.1 * i)],
               hparams={"lr": 0.01, "trade_off": 1.0}) for i, p in enumerate(PAIRS) for s in (0, 1)]
    other = [dict(r, run_id=r["run_id"] + "_01", config={**r["config"], "hparams": {"lr": 0.01, "trade_off": 0.1}},
                  evals=[ev(1, 0.95, 0.5, r["evals"][0]["tgt_test"]["acc"] + (0.05 if i % 2 else -0.05))])
             for i, r in enumerate(one)]
    for rule in ("last", "src_val", "oracle"):
        before = build_table(one, rule)["rows"]
        after = build_table(one + other, rule)["rows"]
        assert len(before) == 1 and len(after) == 2
        (same,) = [r for r in after if r["method_setting"]["hparams"]["trade_off"] == 1.0]
        assert {p: c["accs"] for p, c in same["cells"].items()} == {p: c["accs"] for p, c in before[0]["cells"].items()}
        assert same["avg"] == before[0]["avg"]
        assert sorted(r["display"] for r in after) == ["DANN (trade_off=0.1)", "DANN (trade_off=1.0)"]
        assert before[0]["display"] == "DANN"  # alone, the row keeps the method's name
    csv_text = to_csv([build_table(one + other, "last")])
    assert csv_text.count('""trade_off"": 0.1') == len(PAIRS) and csv_text.count('""trade_off"": 1.0') == len(PAIRS)


def test_a_different_source_model_is_a_different_row():
    recs = [rec("adda", "adversarial", "0", PAIRS[0], s, [ev(1, 0.9, 0.5, 0.7)]) for s in (0, 1)]
    for r, lr in zip(recs, (0.01, 0.03)):
        r["config"]["source_hparams"] = {"lr": lr}
    assert sorted(r["display"] for r in build_table(recs, "last")["rows"]) == ["ADDA (source lr=0.01)",
                                                                               "ADDA (source lr=0.03)"]


def test_a_spec_name_names_the_row():
    a, b = _trial_pair()
    t = build_table(a + b, "last", groups={r["run_id"]: RowGroup(name="m, small lr") for r in b})
    assert sorted(r["display"] for r in t["rows"]) == ["m (lr=0.1)", "m, small lr"]


PAIRS = (("mnist5k", "ucidigits"), ("ucidigits", "mnist5k"))


def golden_records():
    out = []
    for pair, base in zip(PAIRS, (0.60, 0.70)):
        for seed in (0, 1, 2):
            out.append(rec("source_only", "baseline", "0", pair, seed, [ev(1, 0.9, base, base + 0.01 * seed)]))
            out.append(rec("dann", "adversarial", "0", pair, seed, [ev(1, 0.9, base, base + 0.05 + 0.02 * seed)]))
            out.append(rec("finetune", "fine-tuning", "5", pair, seed, [ev(1, 0.9, base, base + 0.2)]))
    out.append(rec("dann", "adversarial", "0", PAIRS[0], 3, [ev(1, 0.9, 0.1, 0.1)], status="diverged"))
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
    ab = "mnist5k→ucidigits"
    assert rows["dann"]["cells"][ab]["n_failed"] == 1 and len(rows["dann"]["cells"][ab]["accs"]) == 3
    assert rows["dann"]["mark"][ab] == "best" and rows["source_only"]["mark"][ab] == "second"
    assert rows["finetune"]["mark"][ab] == "best"  # its own label-budget group
    assert rows["dann"]["rank"] == 1.0 and rows["source_only"]["rank"] == 2.0
    assert abs(rows["dann"]["avg"] - (67.0 + 77.0) / 2) < 1e-9
    # delta vs source-only under the same rule: average and per pair
    assert rows["source_only"]["delta"] is None and abs(rows["dann"]["delta"] - 6.0) < 1e-9
    assert abs(rows["dann"]["cells"][ab]["delta"] - 6.0) < 1e-9 and abs(rows["finetune"]["delta"] - 19.0) < 1e-9
    # the run ids behind each cell are kept (the diverged seed-3 run too)
    assert [x["run_id"] for x in rows["dann"]["cells"][ab]["runs"]][-1] == "dann__mnist5k-ucidigits__b0__s3"


def test_write_tables_and_runs_csv(tmp_path):
    recs = golden_records()
    files = write_tables(recs, tmp_path / "out", ["last", "oracle"], "dalab table X")
    assert {f.name for f in files} == {"table.md", "table_last.tex", "table_oracle.tex", "table.csv", "runs.csv",
                                       "accuracy.png"}
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
    t = build_table(a + b, "last")
    rows = t["rows"]  # each row names what differs; the caption what they share
    assert sorted(r["display"] for r in rows) == ["m (1 step)", "m (2 steps)"]
    assert "(lenet)" in caption(t)
    assert sorted(r["cells"]["a→b"]["accs"][0] for r in rows) == [50.0, 90.0]


# --------------------------------------------------------------------------- significance

def _cell_records(method, accs_by_pair, family="adversarial"):
    return [rec(method, family, "0", pair, seed, [ev(1, 0.9, 0.5, a / 100)])
            for pair, accs in accs_by_pair.items() for seed, a in enumerate(accs)]


def test_significance_flags_a_clear_gain_and_not_identical_numbers():
    base = {PAIRS[0]: [60.0, 64.0, 62.0], PAIRS[1]: [70.0, 71.0, 69.0]}
    recs = (_cell_records("source_only", base, "baseline")
            + _cell_records("dann", {PAIRS[0]: [75.0, 79.0, 77.5], PAIRS[1]: [55.0, 56.5, 54.0]})  # +15, -15
            + _cell_records("cdan", base)                                                          # identical
            + _cell_records("mdd", {PAIRS[0]: [70.0, 55.0, 62.0], PAIRS[1]: [71.0, 69.0, 72.0]}))  # noise
    rows = {r["method"]: r for r in build_table(recs, "last")["rows"]}
    ab, ba = "mnist5k→ucidigits", "ucidigits→mnist5k"
    assert rows["dann"]["cells"][ab]["sig"] == "↑" and rows["dann"]["cells"][ab]["p"] < 0.05
    assert rows["dann"]["cells"][ba]["sig"] == "↓"
    assert rows["cdan"]["cells"][ab]["sig"] == "" and rows["cdan"]["delta"] == 0.0
    assert rows["mdd"]["cells"][ab]["sig"] == "" and rows["mdd"]["cells"][ab]["p"] > 0.05
    assert rows["source_only"]["cells"][ab]["sig"] == "" and rows["source_only"]["cells"][ab]["p"] is None
    md = to_markdown(build_table(recs, "last"))
    assert "77.2 ± 2.0 ↑" in md and "55.2 ± 1.3 ↓" in md and "paired t-test over seeds" in md
    assert "an unmarked cell is no evidence of equality" in md


def test_paired_test_needs_two_common_seeds():
    from dalab.stats import paired_test

    assert paired_test({0: 90.0}, {0: 50.0}) == (None, "")
    assert paired_test({0: 90.0, 1: 91.0}, {2: 50.0, 3: 51.0}) == (None, "")


def test_friedman_and_nemenyi_on_known_ranks():
    from dalab.stats import friedman

    # 6 blocks, the same order in each: a > b > c > d
    r = friedman({"a": [90, 80, 85, 70, 95, 88], "b": [80, 70, 75, 60, 85, 78], "c": [70, 60, 65, 50, 75, 68],
                  "d": [60, 50, 55, 40, 65, 58]})
    assert r["ranks"].to_dict() == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert abs(r["statistic"] - 18.0) < 1e-9 and r["p"] < 0.001  # chi2 = 12/(nk(k+1)) sum R^2 - 3n(k+1)
    assert r["nemenyi"].loc["a", "d"] < 0.05 and r["nemenyi"].loc["a", "b"] > 0.05
    same = friedman({"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "c": [1, 2, 3, 4]})
    assert not same["p"] < 0.05
    assert friedman({"a": [1, 2], "b": [2, 1]}) is None  # fewer than 3 methods
    assert friedman({"a": [1, 2, 3], "b": [2, 1, 3], "c": [3, 2, 1]}) is None  # fewer than MIN_BLOCKS pairs


FOUR_PAIRS = PAIRS + (("syndigits", "mnist5k"), ("mnist5k", "mnistm5k"))


def _four_pair_records(n_seeds=3):
    return [rec(m, fam, "0", p, s, [ev(1, 0.9, 0.5, base / 100 + 0.01 * i + 0.002 * s)])
            for m, fam, base in (("source_only", "baseline", 50), ("dann", "adversarial", 60), ("mdd", "adversarial", 70))
            for i, p in enumerate(FOUR_PAIRS) for s in range(n_seeds)]


def test_cd_diagrams_per_rule_png_and_pdf(tmp_path):
    files = write_tables(_four_pair_records(), tmp_path, ["last", "oracle"], "X")
    names = {f.name for f in files}
    assert {"cd_last.png", "cd_last.pdf", "cd_oracle.png", "cd_oracle.pdf"} <= names
    assert (tmp_path / "cd_last.pdf").read_bytes().startswith(b"%PDF")
    md = (tmp_path / "table.md").read_text()
    assert "Friedman test across 4 pairs, 3 methods without target labels" in md
    assert "cd_last.png" in md


def test_tests_are_printed_only_with_enough_seeds_and_pairs():
    """With 2 seeds and 2 pairs a table prints no significance marks and no Friedman test, and says
    why in one line each; plurals follow the counts."""
    few = [r for r in _four_pair_records(n_seeds=2) if (r["config"]["source"], r["config"]["target"]) in PAIRS]
    md = to_markdown(build_table(few, "last"))
    assert "↑" not in md.split("No significance")[0].split("| Method")[1] and "No significance marks: the paired test " \
        "needs ≥ 3 seeds per cell (here 2)." in md
    assert "No Friedman test across pairs: it needs ≥ 4 pairs" in md and "over 2 seeds" in md
    many = to_markdown(build_table(_four_pair_records(), "last"))
    assert "↑" in many and "Friedman test across 4 pairs" in many
    one = to_markdown(build_table([r for r in few if r["config"]["seed"] == 0], "last"))
    assert "over 1 seed (" in one and "degrees" not in one and "1 steps" not in one


# --------------------------------------------------------------------------- display names and the oracle

def test_display_names_in_every_renderer(tmp_path):
    t = build_table(golden_records(), "oracle")
    outs = {"md": to_markdown(t), "tex": to_latex(t), "csv": to_csv([t])}
    for fmt, text in outs.items():
        assert "Source only" in text and "DANN" in text and "Fine-tuning" in text, fmt
    assert "| Source only | Baseline |" in outs["md"] and "MNIST-5k → UCI digits" in outs["md"]
    assert "Source only & Baseline" in outs["tex"] and r"MNIST-5k $\to$\\UCI digits" in outs["tex"]  # 2-line header
    assert "source\\_only" not in outs["tex"] and "| source_only |" not in outs["md"]
    # the oracle rule is labelled as the oracle wherever it is named
    assert "ORACLE" in outs["md"].splitlines()[0] and "ORACLE" in outs["tex"]
    from dalab.datasets.shift_table import shift_table
    recs = golden_records()
    for r in recs:
        d = tmp_path / "runs" / r["run_id"]
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(dict(r, final=r["evals"][-1] if r["status"] == "done" else None)))
    shift = shift_table(tmp_path / "runs", pairs=list(PAIRS))
    assert "| MNIST-5k → UCI digits |" in shift


def test_rule_registry_is_the_one_source():
    from dalab.bench import RULES as BENCH_RULES
    from dalab.cli import build_parser
    from dalab.selection import RULES, markdown

    assert tuple(BENCH_RULES) == tuple(RULES)
    assert [r.name for r in RULES.values() if r.needs_target_labels] == ["oracle", "oracle_last"]
    help_text = build_parser()._subparsers._group_actions[0].choices["table"].format_help()
    for name in RULES:
        assert name in help_text
    assert "**yes: oracle**" in markdown()


# --------------------------------------------------------------------------- LaTeX compiles

def test_generated_latex_compiles_with_pdflatex(tmp_path):
    import os
    import shutil
    import subprocess

    if shutil.which("pdflatex") is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing in CI: .ci/run installs texlive-latex-base/-recommended")
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    recs = _four_pair_records() + _cell_records("cdan", {PAIRS[0]: [50, 51, 52], PAIRS[1]: [60, 61, 62]})
    recs += [dict(r, hparams={"mixup": "source"}) for r in _cell_records("mdd", {PAIRS[0]: [50, 51, 52]})]
    rules = ["last", "src_val", "im", "entropy", "snd", "oracle"]
    write_tables(recs, tmp_path, rules, "dalab table x_y", plots=False)
    other = tmp_path / "other"  # a second folder's tables of the same rules: labels must not clash
    write_tables(recs[:20], other, rules, "dalab table x_y", plots=False)
    inputs = "".join(f"\\input{{table_{r}.tex}}\n\\input{{other/table_{r}.tex}}\n" for r in rules)
    for layout in ("", "twocolumn"):
        doc = tmp_path / f"doc{layout}.tex"
        doc.write_text(f"\\documentclass[{layout}]{{article}}\n\\usepackage[T1]{{fontenc}}\n\\usepackage{{booktabs,graphicx}}\n"
                       f"\\begin{{document}}\n{inputs}\\end{{document}}\n")
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        log = doc.with_suffix(".log").read_text(errors="replace") if doc.with_suffix(".log").exists() else r.stdout
        errors = [ln for ln in log.splitlines() if ln.startswith("!")]
        assert r.returncode == 0 and not errors, "\n".join(errors) or r.stdout[-2000:]
        assert "multiply defined" not in log  # every table has its own label
        assert doc.with_suffix(".pdf").stat().st_size > 1000
    # a caption of at most ~3 lines of a two-column layout (~55 characters each), the notes below
    for r in rules:
        tex_text = (tmp_path / f"table_{r}.tex").read_text()
        cap = tex_text.split("\\caption{", 1)[1].split("}\n", 1)[0]
        assert len(cap) <= 3 * 60, cap
        assert "ttest_rel" not in tex_text and "table.csv" not in tex_text and "Markdown" not in tex_text
        assert "\\footnotesize" in tex_text and f"\\label{{tab:{tmp_path.name.replace('_', '-')}-{r}}}" in tex_text


# --------------------------------------------------------------------------- dalab table: explain and filters

def _run_folder(tmp_path, recs):
    for r in recs:
        d = tmp_path / r["run_id"]
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))
        (d / "done").write_text(r["status"] + "\n")
    return tmp_path


def test_explain_prints_the_runs_behind_a_cell(tmp_path, capsys):
    from dalab.cli import main

    runs = _run_folder(tmp_path / "runs", [
        rec("dann", "adversarial", "0", PAIRS[0], s, [ev(100, 0.9, 0.5 + 0.1 * s, 0.61 + s / 100),
                                                      ev(200, 0.95, 0.4, 0.55)], hparams={"trade_off": 0.5})
        for s in (0, 1)] + [rec("source_only", "baseline", "0", PAIRS[0], s, [ev(200, 0.9, 0.5, 0.5)]) for s in (0, 1)])
    assert main(["table", str(runs), "--explain", "DANN", "mnist5k:ucidigits", "--rule", "oracle"]) == 0
    out = capsys.readouterr().out
    assert "DANN (dann) on MNIST-5k → UCI digits" in out and "ORACLE" in out
    for s in (0, 1):
        line = next(ln for ln in out.splitlines() if f"dann__mnist5k-ucidigits__b0__s{s}" in ln)
        assert line.split()[1:] == [str(s), "done", "100", f"{61 + s:.2f}"]  # seed, status, chosen step, acc
    assert out.count("reproduce: dalab run --method dann --source mnist5k --target ucidigits") == 2
    assert "--set trade_off=0.5" in out and "vs Source only: +11.5" in out
    assert main(["table", str(runs), "--explain", "dann", "mnist5k:ucidigits"]) == 0
    assert " 200 " in capsys.readouterr().out  # last
    assert main(["table", str(runs), "--explain", "mdd", "mnist5k:ucidigits"]) == 2
    assert "no runs of 'mdd'" in capsys.readouterr().err


def test_table_filters_and_formats(tmp_path, capsys):
    from dalab.cli import main

    runs = _run_folder(tmp_path / "runs", golden_records())
    assert main(["table", str(runs), "--format", "csv", "--rules", "oracle", "--methods", "dann",
                 "--pairs", "ucidigits:mnist5k"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("oracle,dann,DANN,adversarial,0,") and "UCI digits → MNIST-5k" in lines[1]
    assert "+6.00" in lines[1]  # the delta still comes from the (filtered-out) baseline
    assert main(["table", str(runs), "--format", "md", "--rules", "last", "--budgets", "5"]) == 0
    md = capsys.readouterr().out
    assert "| Fine-tuning |" in md and "| DANN |" not in md and "| Source only |" not in md
    assert main(["table", str(runs), "--format", "tex", "--rules", "last,src_val", "--baseline", "dann"]) == 0
    tex = capsys.readouterr().out
    assert tex.count(r"\begin{table}") == 2 and "gain of the average over DANN" in tex
    assert main(["table", str(runs), "--out", str(tmp_path / "t"), "--rules", "last"]) == 0
    assert (tmp_path / "t" / "table.md").read_text().startswith(f"<!-- generated by: dalab table {runs} --out")
    assert not list(tmp_path.glob("results"))
    assert main(["table", str(runs), "--rules", "best"]) == 2
    assert "unknown selection rule 'best'" in capsys.readouterr().err


# --------------------------------------------------------------------------- results/README.md

def test_results_index_reads_every_file_and_its_command(tmp_path):
    from dalab.results_index import index

    res = tmp_path / "results"
    files = write_tables(_four_pair_records(), res / "digits", ["last"], "make bench")
    (res / "speed.md").write_text("<!-- generated by: python -m dalab.benchmarks.speed --out results/speed.md -->\nx\n")
    (res / "runs" / "r1").mkdir(parents=True)
    (res / "runs" / "r1" / "record.json").write_text("{}")
    text = index(res, root=Path(__file__).parent.parent)
    for f in files:
        row = next(ln for ln in text.splitlines() if f"[`{f.name}`]" in ln)
        assert row.endswith("| `make bench` |") and "not recorded" not in row, row
    assert "Critical-difference diagram, selection rule Last: mean rank" in text  # the PNG's own description
    assert "The main job" in text  # table.md: the make target's comment in the Makefile
    assert "| Training throughput" in text and "`python -m dalab.benchmarks.speed --out results/speed.md`" in text
    assert "record.json" not in text


def test_display_names_are_unique_and_declared_with_each_thing():
    from dalab import display
    from dalab.datasets import DOMAINS
    from dalab.methods import METHODS

    names = [c.display for c in METHODS.values()]
    assert len(names) == len(set(names)), "two methods share a display name"
    by_family: dict[str, list[str]] = {}
    for d in DOMAINS.values():
        by_family.setdefault(d.family, []).append(d.display)
    for fam, ds in by_family.items():
        assert len(ds) == len(set(ds)), f"two {fam} domains share a display name"
    assert METHODS["cdan"].display == "CDAN+E" and METHODS["source_only"].display == "Source only"
    assert display.pair("mnist5k", "ucidigits") == "MNIST-5k → UCI digits"
    assert display.method("not_a_method") == "not_a_method" and display.family("fine-tuning") == "Fine-tuning"


def test_a_documented_failure_marks_the_row_and_prints_its_footnote():
    """A method with ``known_failure`` (entropy_min) gets a ‡ on its row and the reason under the
    table in every renderer; methods without one are unmarked."""
    from dalab.methods import METHODS

    from dalab import display

    assert display.failure("entropy_min") and not display.failure("dann")
    assert not display.failure("im")   # IM subclasses entropy minimisation: the note is not inherited
    # a note given per label-set setting shows only in that setting's tables
    assert not display.failure("mcc") and display.failure("mcc", ["openset"])
    assert display.failure("mcc", ["closed", "openset"]).startswith("(openset) ")
    accs = {PAIRS[0]: [60.0, 61.0, 62.0], PAIRS[1]: [70.0, 71.0, 69.0]}
    recs = (_cell_records("source_only", accs, "baseline") + _cell_records("dann", accs)
            + _cell_records("entropy_min", {PAIRS[0]: [30.0, 31.0, 32.0], PAIRS[1]: [40.0, 41.0, 39.0]},
                            "regularization"))
    t = build_table(recs, "last")
    md = to_markdown(t)
    assert "| Entropy min. ‡ |" in md and "| DANN |" in md
    assert f"‡ Entropy min.: {METHODS['entropy_min'].known_failure}" in md
    tex = to_latex(t)
    assert r"Entropy min. $^\ddagger$" in tex and "falls with training" in tex


def test_caption_and_label_can_be_replaced(tmp_path, capsys):
    from dalab.cli import main

    runs = _run_folder(tmp_path / "runs", _four_pair_records())
    assert main(["table", str(runs), "--format", "tex", "--rules", "last", "--caption", "Digits, rule {rule}.",
                 "--label", "tab:mine"]) == 0
    tex_text = capsys.readouterr().out
    assert r"\caption{Digits, rule last.}" in tex_text and r"\label{tab:mine-last}" in tex_text
    assert main(["table", str(runs), "--out", str(tmp_path / "t"), "--rules", "last", "--caption", "A {rule} table"]) == 0
    assert "--caption 'A {rule} table'" in (tmp_path / "t" / "table.md").read_text().splitlines()[0]


def test_domainbeds_oracle_takes_the_last_point_and_only_chooses_among_trials():
    """oracle_last (DomainBed's test-domain validation): no early stopping on target data -- every
    run is read at its last checkpoint; target-validation accuracy there only picks among trials."""
    from dalab.selection import RULES

    r = rec("m", "f", "0", ("a", "b"), 0, [ev(1, 0.9, 0.95, 0.90), ev(2, 0.9, 0.50, 0.60)])
    assert select(r, "oracle")["step"] == 1 and select(r, "oracle_last")["step"] == 2
    assert RULES["oracle_last"].needs_target_labels and "ORACLE" in RULES["oracle_last"].label
    trials = [rec("m", "f", "0", ("a", "b"), 0, [ev(1, 0.9, 0.9, 0.9), ev(2, 0.9, v, t)], hparams={"lr": lr})
              for lr, v, t in ((0.1, 0.40, 0.45), (0.01, 0.70, 0.65))]
    from dalab.tables import RowGroup

    for i, x in enumerate(trials):
        x["run_id"] += str(i)
    groups = {x["run_id"]: RowGroup(search="s") for x in trials}
    cell = build_table(trials, "oracle_last", groups=groups)["rows"][0]["cells"]["a→b"]
    assert cell["accs"] == [pytest.approx(65.0)]  # the trial with the better last-point target validation


def test_a_table_can_show_the_standard_error_instead_of_the_std(tmp_path):
    from dalab.tables import write_tables

    recs = [rec("m", "f", "0", ("a", "b"), s, [ev(1, 0.9, 0.5, acc)]) for s, acc in enumerate((0.50, 0.60, 0.70))]
    write_tables(recs, tmp_path, ["last"], plots=False, spread="se")
    md = (tmp_path / "table.md").read_text()
    assert "60.0 ± 5.8" in md and "mean ± standard error" in md  # std 10.0 / sqrt(3)
    write_tables(recs, tmp_path, ["last"], plots=False)
    assert "60.0 ± 10.0" in (tmp_path / "table.md").read_text()
