"""The hard-shift report's measured reasons (benchmarks/hard_report.py) on hand-made records."""

from __future__ import annotations

import math

import pytest

from dalab.benchmarks.hard_report import REASONS, measures, reason


def _record(method: str, seed: int, tgt: float, src: float, train: list[float], neg_entropy: float,
            status: str = "done") -> dict:
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    evals = [{"step": 125 * (i + 1), "src_val": m(src), "tgt_val": m(tgt), "tgt_test": m(tgt), "tgt_train": m(a),
              "tgt_train_unsup": {"entropy": neg_entropy}} for i, a in enumerate(train)]
    return {"run_id": f"{method}__a-b__b0__s{seed}", "status": status, "config": {"source": "a", "target": "b"},
            "method": {"name": method}, "evals": evals}


def test_measures_are_seed_means_at_the_rules_checkpoint():
    recs = [_record("shot", s, 0.10 + 0.02 * s, 0.9, [0.30, 0.20], -0.2) for s in range(2)]
    got = measures(recs, "last")[("shot", "a→b")]
    assert got["acc"] == pytest.approx(11.0) and got["src"] == pytest.approx(90.0)
    assert got["train_first"] == pytest.approx(30.0) and got["train_last"] == pytest.approx(20.0)
    assert got["entropy"] == pytest.approx(0.2) and got["n"] == 2 and got["diverged"] == 0


def test_the_first_reason_that_holds_is_given_with_its_evidence():
    so = measures([_record("source_only", 0, 0.2, 0.9, [0.2, 0.2], -1.0)], "last")[("source_only", "a→b")]
    cases = {
        REASONS[0]: _record("dann", 0, 0.1, 0.9, [0.2, 0.1], -1.0, status="diverged"),
        REASONS[1]: _record("dann", 0, 0.1, 0.5, [0.2, 0.1], -0.1),         # source val 50 vs 90: given up first
        REASONS[2]: _record("im", 0, 0.1, 0.9, [0.2, 0.1], -0.3),           # 0.3 vs 1.0 nats
        REASONS[3]: _record("dan", 0, 0.1, 0.9, [0.2, 0.1], -1.05),      # 20 -> 10 on target train
        REASONS[4]: _record("mcd", 0, 0.1, 0.9, [0.1, 0.1], -1.05),
    }
    for want, rec in cases.items():
        m = measures([rec], "last")[(rec["method"]["name"], "a→b")]
        why, evidence = reason(m, so)
        assert why == want, (want, evidence)
        assert evidence and "nan" not in evidence
    assert math.isnan(measures([{**cases[REASONS[4]], "evals": [
        {k: v for k, v in e.items() if k != "tgt_train"} for e in cases[REASONS[4]]["evals"]]}], "last")
        [("mcd", "a→b")]["train_last"])  # a record from before tgt_train was scored: NaN, not a crash
    given_up = measures([cases[REASONS[1]]], "last")[("dann", "a→b")]
    assert reason(given_up, so, uses_source=False)[0] == REASONS[2]  # source-free: its source accuracy is no cause
