"""Label-free validators (dalab.validators, registered in dalab.evaluation.UNSUPERVISED_SCORES):
each against a hand computation on a tiny fixed example, the one-pass features they read, the
selection rules over records that lack them, and target-split hygiene -- no rule but the oracle
can see a target label."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score

from dalab import evaluation
from dalab.evaluation import UNSUPERVISED_SCORES, evaluate, forward_split, unsupervised_scores
from dalab.selection import RULES, select, selection_score
from dalab.validators import (MixProbe, bnm_score, cluster_agreement, dev_risk, importance_weights,
                              kmeans_clusters)


def one_hot(classes, k):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), k).double()


# --------------------------------------------------------------------------- BNM

def test_bnm_is_one_for_confident_diverse_predictions_and_lower_otherwise():
    n, k = 40, 4
    assert bnm_score(one_hot(np.arange(n) % k, k)) == pytest.approx(1.0, abs=1e-12)  # balanced one-hot: maximal
    assert bnm_score(one_hot(np.zeros(n, int), k)) == pytest.approx(1 / math.sqrt(k), abs=1e-12)  # one class
    assert bnm_score(torch.full((n, k), 1.0 / k)) == pytest.approx(1 / k, abs=1e-12)  # uniform: rank 1
    p = torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), 1)
    by_hand = np.linalg.svd(p.double().numpy(), compute_uv=False).sum() / math.sqrt(n * k)
    assert bnm_score(p) == pytest.approx(by_hand, abs=1e-12) and 1 / k < bnm_score(p) < 1


# --------------------------------------------------------------------------- ClassAMI, V-measure

def test_cluster_agreement_by_hand():
    preds = one_hot([0, 0, 1, 1], 2)
    assert cluster_agreement(preds, np.array([1, 1, 0, 0]), "ami") == pytest.approx(1.0)  # same partition, renamed
    assert cluster_agreement(preds, np.array([1, 1, 0, 0]), "v_measure") == pytest.approx(1.0)
    # clusters split predicted class 1: homogeneity 1, completeness 1 - H(K|C)/H(K) = 1 - 0.5/1.5 bits
    assert cluster_agreement(preds, np.array([0, 0, 1, 2]), "v_measure") == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    pred6, clus6 = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert cluster_agreement(one_hot(pred6, 2), np.array(clus6), "ami") == pytest.approx(
        adjusted_mutual_info_score(pred6, clus6))
    assert math.isnan(cluster_agreement(preds, None, "ami"))


def test_kmeans_of_separated_features_gives_ami_one_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat_interleave(30)
    centres = torch.eye(5) * 10
    feats = centres[y] + 0.1 * torch.randn(150, 5, generator=g)
    clusters = kmeans_clusters(feats, 5)
    assert cluster_agreement(one_hot(y, 5), clusters, "ami") == pytest.approx(1.0)
    assert cluster_agreement(one_hot(y, 5), clusters, "v_measure") == pytest.approx(1.0)
    assert np.array_equal(clusters, kmeans_clusters(feats, 5))
    assert kmeans_clusters(feats[:3], 5) is None  # fewer samples than classes: no clustering (NaN score)


# --------------------------------------------------------------------------- DEV, DEVN, IWV

def test_dev_by_hand():
    w, loss = np.array([0.5, 1.5, 1.0, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])
    wl = w * loss
    cov = np.sum((wl - wl.mean()) * (w - w.mean())) / 3
    eta = -cov / (np.sum((w - w.mean()) ** 2) / 3)
    assert dev_risk(w, loss) == pytest.approx(wl.mean() + eta * w.mean() - eta, abs=1e-12)
    assert dev_risk(w, loss, control_variate=False) == pytest.approx(wl.mean(), abs=1e-12)  # IWV
    wn = w / w.max()
    wn = wn - wn.mean() + 1  # DEVN's weights have mean 1: the control variate's correction vanishes
    assert dev_risk(w, loss, normalize=True) == pytest.approx(np.mean(wn * loss), abs=1e-12)


def test_dev_with_equal_weights_or_equal_distributions_is_the_plain_mean_loss():
    loss = np.random.default_rng(0).exponential(size=200)
    assert dev_risk(np.ones(200), loss) == pytest.approx(loss.mean(), abs=1e-12)
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    w = importance_weights(f, f)  # the same samples on both sides: nothing tells the domains apart
    assert np.allclose(w, 1.0, atol=1e-3)
    assert dev_risk(w, loss) == pytest.approx(loss.mean(), rel=1e-3)
    assert dev_risk(w, loss, normalize=True) == pytest.approx(loss.mean(), rel=1e-3)


def test_importance_weights_favour_source_samples_that_look_like_target():
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(300, 4, generator=g) + torch.tensor([3.0, 0, 0, 0])
    near = torch.randn(100, 4, generator=g) + torch.tensor([3.0, 0, 0, 0])
    far = torch.randn(100, 4, generator=g) - torch.tensor([3.0, 0, 0, 0])
    w = importance_weights(torch.cat([near, far]), tgt)
    assert w[:100].mean() > 10 * w[100:].mean() and np.isfinite(w).all() and (w > 0).all()


# --------------------------------------------------------------------------- MixVal

def test_mixval_by_hand():
    """A 1-d model: class 1 iff x > 0.15. Pairs are a sample and its mirror in the batch; the mixed
    label is the first sample's pseudo-label (lam = 0.55)."""
    predict = lambda x: torch.cat([-(x - 0.15), x - 0.15], 1)  # noqa: E731
    probe = MixProbe()
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])  # pseudo-labels 0 0 1 1: four inter-cluster pairs
    probe.add(predict, x, predict(x))  # mixes -0.2, -0.1, 0.1, 0.2 -> 0, 0, 0 (label 1: miss), 1
    x = torch.tensor([[-3.0], [-1.0], [-2.0]])  # odd batch: its middle is not paired with itself
    probe.add(predict, x, predict(x))  # mixes -1.9 (pair 0,2) and -2.1 (pair 2,0): two intra hits
    assert probe.counts() == (2, 2, 3, 4)
    assert probe.score() == pytest.approx((1.0 + 0.75) / 2)
    assert math.isnan(MixProbe().score())


# --------------------------------------------------------------------------- at an evaluation point

def _method(name="source_only"):
    from dalab.methods import METHODS, resolve_hparams
    from dalab.methods.nets import build_classifier

    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(build_classifier("lenet", 10), 10, resolve_hparams(cls, {}), 10)
    m.eval()
    return m


def _data():
    from dalab.datasets import load_domain

    src, tgt = load_domain("toy_a"), load_domain("toy_b")
    return {"src_val": src.val, "tgt_val": tgt.val, "tgt_test": tgt.test, "tgt_train": tgt.train}


def test_features_come_from_the_same_forward_pass_as_the_logits():
    m, split = _method(), _data()["tgt_train"]
    seen = []
    m.net.backbone.register_forward_hook(lambda mod, inp, out: seen.append(len(out)))
    out = forward_split(m, split, batch_size=64, features=True)
    assert sum(seen) == len(split)  # one backbone pass over the split, not two
    with torch.inference_mode():
        ref = torch.cat([m.features(x) for x, _ in split.batches(64)])
        logits = torch.cat([m.predict(x) for x, _ in split.batches(64)])
    assert torch.equal(out.features, ref) and torch.equal(out.logits, logits)
    assert "features" not in vars(m)  # the wrapper is gone


def test_a_predict_that_bypasses_features_still_gets_method_features():
    m = _method("self_ensembling")  # in eval mode it predicts with its teacher network
    split = _data()["tgt_train"]
    out = forward_split(m, split, features=True)
    with torch.inference_mode():
        assert torch.equal(out.features, torch.cat([m.features(x) for x, _ in split.batches(256)]))


def test_every_validator_is_recorded_and_a_missing_input_gives_nan():
    m, data = _method(), _data()
    ev = evaluate(m, data)
    assert set(ev["tgt_train_unsup"]) == set(UNSUPERVISED_SCORES)
    assert all(math.isfinite(v) for v in ev["tgt_train_unsup"].values()), ev["tgt_train_unsup"]
    only_logits = unsupervised_scores(torch.randn(50, 10))  # no features, no source validation
    assert math.isnan(only_logits["class_ami"]) and math.isnan(only_logits["dev"]) and math.isnan(only_logits["mixval"])
    assert math.isfinite(only_logits["bnm"]) and math.isfinite(only_logits["snd"])


def test_a_validator_cannot_ask_for_labels(monkeypatch):
    from dalab.utils import DalabError

    monkeypatch.setitem(UNSUPERVISED_SCORES, "peek", lambda logits, labels: 0.0)
    with pytest.raises(DalabError, match="labels"):
        unsupervised_scores(torch.randn(20, 10))


def test_every_label_free_validator_is_a_rule_and_only_the_oracles_read_target_labels():
    assert [r.name for r in RULES.values() if r.needs_target_labels] == ["oracle", "oracle_last"]
    assert set(UNSUPERVISED_SCORES) <= set(RULES)
    assert not any(n.startswith(("tgt", "target", "label")) for n in evaluation.VALIDATOR_INPUTS)


def _relabeled(split, labels):
    from dalab.datasets.base import TensorSplit

    out = TensorSplit(split.images, torch.as_tensor(labels), split.device)
    out.memory_format = split.memory_format
    out.set_standardization(split.mean, split.std)
    return out


def test_no_label_free_rule_can_read_target_labels():
    """Target-split hygiene: the same model evaluated twice, target train / val / test labels
    replaced by ones that make the oracle right everywhere, then wrong everywhere. Every rule that
    does not declare target labels scores each point identically; the oracle's score changes."""
    m, data = _method(), _data()
    truth = {name: evaluation.predict_split(m, data[name])[0].argmax(1).numpy()
             for name in ("tgt_train", "tgt_val", "tgt_test")}
    right = {**data, **{n: _relabeled(data[n], y) for n, y in truth.items()}}
    wrong = {**data, **{n: _relabeled(data[n], (y + 1) % 10) for n, y in truth.items()}}
    a, b = evaluate(m, right), evaluate(m, wrong)
    assert a["tgt_test"]["acc"] == 1.0 and b["tgt_test"]["acc"] == 0.0  # the labels did change
    # target train's labels reach only its transductive accuracy, which no rule reads (checked below)
    assert a["tgt_train"]["acc"] == 1.0 and b["tgt_train"]["acc"] == 0.0
    for rule in RULES.values():
        if rule.other_runs:  # scored from other runs' records: tests/test_multisource.py checks it
            continue
        sa, sb = selection_score(a, rule.name), selection_score(b, rule.name)
        if rule.needs_target_labels:
            assert abs(sa - sb) > 0.5, rule.name
        else:
            assert math.isfinite(sa) and abs(sa - sb) <= 1e-12, (rule.name, sa, sb)


# --------------------------------------------------------------------------- records without them

def test_a_rule_over_a_score_older_records_lack_is_not_available_not_a_crash():
    from dalab.tables import build_table

    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    old = {"step": 1, "src_val": m(0.9), "tgt_val": m(0.5), "tgt_test": m(0.5),
           "tgt_train_unsup": {"im": 0.1, "entropy": -1.0, "snd": 2.0}}
    new = {**old, "step": 2, "tgt_train_unsup": {**old["tgt_train_unsup"], "mixval": 0.7, "dev": None}}
    rec = {"run_id": "dann__a-b__b0__s0", "status": "done",
           "config": {"method": "dann", "source": "a", "target": "b", "seed": 0, "budget": "0", "hparams": {},
                      "backbone": "lenet", "steps": 2, "eval_every": 1, "pretrained": None, "split_seed": 0,
                      "precision": "auto"},
           "method": {"name": "dann", "family": "adversarial", "target_data": "unlabeled", "budget": "0"},
           "evals": [old], "train": {"steps": 1, "wall_time_s": 1.0, "steps_per_s": 1.0}}
    assert select(rec, "mixval") is None and select(rec, "dev") is None
    cell = build_table([rec], "mixval")["rows"][0]["cells"]["a→b"]
    assert cell["n_failed"] == 1 and not cell["accs"]
    rec = {**rec, "evals": [old, new]}
    assert select(rec, "mixval")["step"] == 2 and select(rec, "dev") is None  # null (non-finite) is not available
