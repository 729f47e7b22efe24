"""The validator benchmark's arithmetic (benchmarks/validators.py): weighted Spearman by hand, and
what a validator picks on a hand-made pool."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dalab.benchmarks import validators as vb


def test_weighted_spearman_by_hand():
    acc = np.array([10.0, 20.0, 30.0, 40.0])
    assert vb.weighted_spearman(acc * 2 + 1, acc) == pytest.approx(1.0)
    assert vb.weighted_spearman(-acc, acc) == pytest.approx(-1.0)
    # swapping the two best checkpoints costs more than swapping the two worst (the weights favour the top)
    top = vb.weighted_spearman(np.array([1.0, 2.0, 4.0, 3.0]), acc)
    bottom = vb.weighted_spearman(np.array([2.0, 1.0, 3.0, 4.0]), acc)
    assert top < bottom < 1.0
    assert math.isnan(vb.weighted_spearman(np.ones(4), acc))  # a constant score ranks nothing


def _rec(run: str, accs, im, val=None):
    evals = [{"step": 10 * (i + 1), "tgt_test": {"acc": a}, "tgt_val": {"acc": (val or accs)[i]},
              "src_val": {"acc": 0.9}, "tgt_train_unsup": {"im": s}} for i, (a, s) in enumerate(zip(accs, im))]
    return {"run_id": run, "status": "done", "method": {"name": "dann"},
            "config": {"source": "mnist5k", "target": "mnist5k_rot"}, "evals": evals}


def test_the_study_picks_by_score_and_measures_the_gap_to_the_oracle():
    recs = [_rec("a", [0.5, 0.6, 0.7], [0.1, 0.3, 0.2], val=[0.5, 0.6, 0.8]), _rec("b", [0.4, 0.9], [0.0, 0.05])]
    res = vb.study(vb.pool(recs))
    cell = res["im"]["mnist5k→mnist5k_rot"]
    assert cell["n"] == 5 and cell["picked"] == pytest.approx(60.0)  # im's best point
    # the oracle picks by target VAL (0.9 for run b's second point), reported on target TEST
    assert cell["gap"] == pytest.approx(60.0 - 90.0)
    assert res["oracle"]["mean"]["picked"] == pytest.approx(90.0)
    # a rule whose score the records lack (bnm here) is not available, not a crash
    assert math.isnan(res["bnm"]["mean"]["spearman"])


def test_a_spec_can_switch_expensive_validators_off(tmp_path):
    """`validators:` in a spec: the runs compute only those (ids unchanged: how a run evaluates is
    not what it is); a selection rule that needs a switched-off validator is a one-line error."""
    from dalab.bench import BenchSpec
    from dalab.runs import RunConfig
    from dalab.trainer import train
    from dalab.utils import DalabError

    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=4, eval_every=4)
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False, validators=("im", "bnm"))
    assert set(rec["final"]["tgt_train_unsup"]) == {"im", "bnm"} and rec["run_id"] == cfg.run_id()
    BenchSpec.from_dict({"validators": ["im"], "selection": ["last", "im", "oracle"]})
    with pytest.raises(DalabError, match="leaves out snd"):
        BenchSpec.from_dict({"validators": ["im"], "selection": ["last", "snd"]})
    with pytest.raises(DalabError, match="validators"):
        BenchSpec.from_dict({"validators": ["nope"], "selection": ["last"]})
