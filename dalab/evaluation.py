"""What an evaluation point measures: prediction over a split, classification metrics on every
labeled split, and label-free scores on target train.

:func:`evaluate` is what the trainer calls at each evaluation point; its result is one entry of a
record's ``evals`` (``src_val`` / ``tgt_val`` / ``tgt_test``: :data:`CLASSIFICATION_METRICS`;
``tgt_train_unsup``: :data:`UNSUPERVISED_SCORES`). Both are registries: a new metric (an open-set
H-score) or a new label-free validator is one entry there, and every later record carries it; the
model-selection rules of :mod:`dalab.selection` read these recorded numbers by name. A validator
names what it reads by its parameters (:class:`ValidatorInputs`), and evaluation computes only
what some validator reads (backbone features, MixVal's mixed-sample pass).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch

EVAL_BATCH = 256  # cache-friendly on CPU (1024 was 2x slower on LeNet), plenty on a GPU
LABELED_SPLITS = ("src_val", "tgt_val", "tgt_test")  # scored with labels, read by selection rules and tables; target
# train is scored only for its transductive accuracy (evaluate: ``tgt_train``), which nothing selects on


EVAL_ORDER_SEED = 0  # the order in which a batch-dependent model (Method.batch_statistics) sees a split


@dataclass
class SplitOutputs:
    """One pass of the model over a split: logits (float32, CPU) and labels, in the order the model
    saw the samples; on request its backbone features (``Method.features``: float32, CPU) and
    MixVal's probe (:class:`dalab.validators.MixProbe`)."""

    logits: torch.Tensor
    labels: np.ndarray
    features: torch.Tensor | None = None
    mix: Any = None


def _predict_with_features(method, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and ``method.features(x)`` of one batch in ONE forward pass where ``predict`` goes
    through ``features`` (the base class's ``head(features(x))``, MCD, OVANet): ``features`` is
    wrapped for the call and what it returns is kept. A ``predict`` that does not call it once on
    ``x`` (a teacher network) costs a second call, so the features are always ``method.features(x)``."""
    seen: list[torch.Tensor] = []
    real, own = method.features, vars(method).get("features")
    method.features = lambda inp: seen.append(real(inp)) or seen[-1]  # an instance attribute shadows the method
    try:
        logits = method.predict(x)
    finally:
        if own is None:
            del method.features
        else:
            method.features = own
    f = seen[0] if len(seen) == 1 and len(seen[0]) == len(x) else method.features(x)
    return logits.float(), f.float()


@torch.inference_mode()
def forward_split(method, split, batch_size: int = EVAL_BATCH, features: bool = False, mix=None,
                  shuffle: bool = False) -> SplitOutputs:
    """The model over a whole split (in its precision); device-side results are moved to the host
    once, at the end. ``features``: keep the backbone features of the same pass; ``mix``: a
    :class:`dalab.validators.MixProbe` that probes every batch. A model whose predictions depend on
    the batch (``Method.batch_statistics``: test-batch BatchNorm statistics) sees the split in a
    seeded random order (:data:`EVAL_ORDER_SEED`), in batches of its stream's batch size: never in
    the split's storage order (mnist5k is stored sorted by class), which would hand it one-class
    batches. ``shuffle`` asks for that order for any model (MixVal pairs samples of one batch)."""
    batch_dependent = getattr(method, "batch_statistics", False)
    if batch_dependent or shuffle:
        gen = torch.Generator().manual_seed(EVAL_ORDER_SEED)
        split = split.subset(torch.randperm(len(split), generator=gen).numpy())
        if batch_dependent:
            batch_size = method.hp.batch_size
    logits, labels, feats = [], [], []
    for x, y in split.batches(batch_size):
        if features:
            z, f = _predict_with_features(method, x)
            feats.append(f)
        else:
            z = method.predict(x).float()
        if mix is not None:
            mix.add(method.predict, x, z)
        logits.append(z)
        labels.append(y)
    return SplitOutputs(torch.cat(logits).cpu(), torch.cat(labels).cpu().numpy(),
                        torch.cat(feats).cpu() if features else None, mix)


def predict_split(method, split, batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (float32, CPU) and labels of a whole split: :func:`forward_split`'s."""
    out = forward_split(method, split, batch_size)
    return out.logits, out.labels


# --------------------------------------------------------------------------- with labels

def _accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(labels, pred))


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score
    return float(balanced_accuracy_score(labels, pred))


def _macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(labels, pred, average="macro", zero_division=0))


# name -> metric(labels, predicted classes); recorded for every labeled split at every point
CLASSIFICATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "acc": _accuracy, "bal_acc": _balanced_accuracy, "macro_f1": _macro_f1}


def classification_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Every :data:`CLASSIFICATION_METRICS` entry of the arg-max predictions."""
    return metrics_of(labels, logits.argmax(1).numpy())


def metrics_of(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Every :data:`CLASSIFICATION_METRICS` entry of predicted classes ``pred``. A prediction of a
    class the split does not have (a source-private class on a partial target, "unknown" on source
    validation) is an error like any other; sklearn's warning about it is expected and silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return {name: metric(labels, pred) for name, metric in CLASSIFICATION_METRICS.items()}


# --------------------------------------------------------------------------- tasks with unknown classes

# A closed-set method on a task whose target has unknown classes (open-set, universal) is scored with
# the rejection baseline: "unknown" when its max softmax is below a threshold chosen on SOURCE
# validation data only -- the max-softmax value that this fraction of source-val samples falls below
# (95% of known-class source samples are accepted, the usual operating point of OOD detection).
REJECT_QUANTILE = 0.05
REJECT_RULE = (f"closed-set methods: unknown when the max softmax is below its {REJECT_QUANTILE * 100:.0f}th "
               f"percentile on source validation (no target label chooses it)")


def open_set_metrics(labels: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    """Open-set scores of predictions in 0..K (K = "unknown") against labels in 0..K: OS* (mean
    per-class accuracy over the known classes present), UNK (recall of the unknown class), the
    H-score (their harmonic mean; Fu et al., ECCV 2020) and OS (per-class mean over the known classes
    and unknown). NaN where a part is undefined (no known or no unknown sample)."""
    recalls = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels) if c < k]
    os_star = float(np.mean(recalls)) if recalls else float("nan")
    unk = float(np.mean(pred[labels == k] == k)) if np.any(labels == k) else float("nan")
    h = 0.0 if os_star + unk == 0 else 2 * os_star * unk / (os_star + unk)
    os_ = float(np.mean(recalls + [unk]))
    return {"os_star": os_star, "unk": unk, "h_score": float(h), "os": os_}


def rejection_threshold(src_val_logits: torch.Tensor) -> float:
    """The rejection baseline's threshold: the :data:`REJECT_QUANTILE` quantile of the max softmax
    over source validation (a closed-set model's, K classes)."""
    conf = torch.softmax(src_val_logits.float(), 1).max(1).values
    return float(torch.quantile(conf, REJECT_QUANTILE))


def open_predictions(logits: torch.Tensor, k: int, threshold: float | None) -> np.ndarray:
    """Predicted classes in 0..K: ``threshold`` None = a method that decides "unknown" itself
    (``Method.open_set``: K + 1 scores, argmax); otherwise a closed-set one's K logits, "unknown"
    below the rejection ``threshold``."""
    if threshold is None:
        return logits.argmax(1).numpy()
    conf, pred = torch.softmax(logits.float(), 1).max(1)
    pred[conf < threshold] = k
    return pred.numpy()


# --------------------------------------------------------------------------- without labels

def snd_score(preds: torch.Tensor, temperature: float = 0.05, chunk: int = 1024) -> float:
    """Soft neighbourhood density (Saito et al., ICCV 2021) of softmax predictions: the mean over
    samples of the entropy of softmax(cos(p_i, p_j) / T) over the other samples j. The same
    numbers as pytorch-adapt's SNDValidator (tested bit-identical), computed with one matrix
    product per chunk of rows and the self-similarity masked to -inf instead of being cut out
    row by row -- 3-4x faster; it was a third of an evaluation point on CPU."""
    from pytorch_metric_learning.utils.common_functions import small_val

    p = torch.nn.functional.normalize(preds.float(), dim=1)
    eps = small_val(p.dtype)
    out = []
    for i in range(0, len(p), chunk):
        sim = p[i:i + chunk] @ p.T
        rows = torch.arange(len(sim))
        sim[rows, rows + i] = float("-inf")
        q = torch.softmax(sim / temperature, 1)
        out.append(-(q * torch.log(q + eps)).sum(1))
    return float(torch.cat(out).mean())


def _pytorch_adapt_validator(name: str) -> Callable[[dict[str, torch.Tensor]], float]:
    def score(split: dict[str, torch.Tensor]) -> float:
        with warnings.catch_warnings():  # torchmetrics 0.9 (pytorch-adapt's pin) warns about pkg_resources
            warnings.simplefilter("ignore")
            import pytorch_adapt.validators as v
        return float(getattr(v, name)()(target_train=split))
    return score


class ValidatorInputs:
    """What a label-free validator may read at one evaluation point, each computed once, on first
    use. A validator names what it reads by its parameters (as pytorch-adapt's validators declare
    the splits they need): ``split`` (target-train ``{"logits", "preds"}``, pytorch-adapt's form),
    ``logits``, ``preds`` (softmax), ``features`` (target-train backbone features), ``clusters``
    (their k-means clusters, k = the number of model outputs), ``weights`` (importance weights of
    source-val samples: a domain classifier on source-val vs target-train features), ``src_losses``
    (per-sample cross-entropy on source validation), ``mix`` (MixVal's probe of the target-train
    pass). NO TARGET LABEL is among them: the only labels are source validation's. An input that
    is not available (None: no features were computed) makes the validator's score NaN."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor | None = None,
                 src_val: SplitOutputs | None = None, mix=None):
        self.logits, self.features, self.mix = logits, features, mix
        self._src_val = src_val

    @cached_property
    def preds(self) -> torch.Tensor:
        return torch.softmax(self.logits, 1)

    @cached_property
    def split(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits, "preds": self.preds}

    @cached_property
    def clusters(self) -> np.ndarray | None:
        from dalab.validators import kmeans_clusters
        return None if self.features is None else kmeans_clusters(self.features, self.logits.shape[1])

    @cached_property
    def weights(self) -> np.ndarray | None:
        from dalab.validators import importance_weights
        src = self._src_val
        if self.features is None or src is None or src.features is None:
            return None
        return importance_weights(src.features, self.features)

    @cached_property
    def src_losses(self) -> np.ndarray | None:
        src = self._src_val
        if src is None:
            return None
        return torch.nn.functional.cross_entropy(src.logits, torch.as_tensor(src.labels), reduction="none").numpy()


VALIDATOR_INPUTS = ("split", "logits", "preds", "features", "clusters", "weights", "src_losses", "mix")
_NEEDS_TARGET_FEATURES = {"features", "clusters", "weights"}


def _bnm(preds):
    from dalab.validators import bnm_score
    return bnm_score(preds)


def _agreement(how: str) -> Callable:
    def score(preds, clusters):
        from dalab.validators import cluster_agreement
        return cluster_agreement(preds, clusters, how)
    return score


def _neg_risk(**kw) -> Callable:
    def score(weights, src_losses):
        from dalab.validators import dev_risk
        return -dev_risk(weights, src_losses, **kw)
    return score


# label-free validators, higher is better: name -> score of what it reads (its parameters, from
# ValidatorInputs); a risk is recorded negated. The math and the papers: dalab.validators.
# A selection rule (dalab.selection) picks by one.
UNSUPERVISED_SCORES: dict[str, Callable[..., float]] = {
    "im": _pytorch_adapt_validator("IMValidator"),  # information maximisation, Shi & Sha 2012 (pytorch-adapt)
    "entropy": _pytorch_adapt_validator("EntropyValidator"),  # negative mean prediction entropy (pytorch-adapt)
    "snd": lambda preds: snd_score(preds),        # soft neighbourhood density, Saito et al. 2021
    "bnm": _bnm,                                  # batch nuclear norm, Cui et al. 2020, normalised to [0, 1]
    "class_ami": _agreement("ami"),               # ClassAMI, Musgrave et al. 2022
    "v_measure": _agreement("v_measure"),         # V-measure, Ericsson et al. 2023
    "dev": _neg_risk(),                           # -DEV risk, You et al. 2019
    "devn": _neg_risk(normalize=True),            # -DEVN risk, Musgrave et al. 2022
    "iwv": _neg_risk(control_variate=False),      # -importance-weighted validation risk, Sugiyama et al. 2007
    "mixval": lambda mix: mix.score(),            # MixVal, Hu et al. 2023
}
UNSUPERVISED_VALIDATORS = tuple(UNSUPERVISED_SCORES)
# recorded as the negative of a quantity people read the other way round (logged under both names)
NEGATED_SCORES = ("entropy", "dev", "devn", "iwv")


def validator_reads(fn: Callable) -> tuple[str, ...]:
    """The :class:`ValidatorInputs` a validator reads (its parameter names)."""
    from dalab.utils import DalabError

    names = tuple(inspect.signature(fn).parameters)
    bad = [n for n in names if n not in VALIDATOR_INPUTS]
    if bad:
        raise DalabError(f"a label-free validator reads {', '.join(bad)}; it may read: {', '.join(VALIDATOR_INPUTS)}")
    return names


def validator_needs(names=None) -> set[str]:
    """Every input some registered validator (of ``names``; None = all) reads."""
    return {n for name, fn in UNSUPERVISED_SCORES.items() if names is None or name in names for n in validator_reads(fn)}


def unsupervised_scores(logits: torch.Tensor, features: torch.Tensor | None = None,
                        src_val: SplitOutputs | None = None, mix=None, names=None) -> dict[str, float]:
    """Every :data:`UNSUPERVISED_SCORES` entry, from target-train logits (and features, MixVal's
    probe) and source validation's outputs. No target label is touched. scikit-learn's thread pools
    are held to torch's thread count (a bench worker's budget)."""
    from threadpoolctl import threadpool_limits

    inputs = ValidatorInputs(logits, features, src_val, mix)
    out = {}
    with threadpool_limits(torch.get_num_threads()):
        for name, fn in UNSUPERVISED_SCORES.items():
            if names is not None and name not in names:  # switched off (a spec's `validators:`)
                continue
            args = {n: getattr(inputs, n) for n in validator_reads(fn)}
            out[name] = float("nan") if any(v is None for v in args.values()) else float(fn(**args))
    return out


# --------------------------------------------------------------------------- one evaluation point

def evaluate(method, data: dict, label_set=None, validators=None) -> dict[str, Any]:
    """Metrics on every labeled split (:data:`LABELED_SPLITS`), label-free scores on target train
    (``data["tgt_train"]``) and its transductive accuracy (``tgt_train``), with the method in eval
    mode (its mode is restored after). On a task
    whose target has unknown classes (``label_set``: a :class:`dalab.tasks.LabelSet`) the target
    splits also get :func:`open_set_metrics`, of predictions that include "unknown"
    (:func:`open_predictions`), and the point records the rejection threshold a closed-set method used.
    ``validators``: the label-free scores to compute (None = every registered one; a spec can switch
    expensive ones off, :class:`dalab.runs.RunOptions`); what none of them needs is not computed."""
    from dalab.validators import MixProbe

    was_training = method.training
    method.eval()
    out: dict[str, Any] = {}
    needs = validator_needs(validators)
    src_features = "weights" in needs
    preds = {name: forward_split(method, data[name], features=src_features and name == "src_val")
             for name in LABELED_SPLITS}
    if label_set is not None and label_set.has_unknown:
        k = label_set.num_known
        threshold = None if getattr(method, "open_set", False) else rejection_threshold(preds["src_val"].logits)
        out["src_val"] = classification_metrics(preds["src_val"].logits, preds["src_val"].labels)
        for name in LABELED_SPLITS[1:]:
            pred = open_predictions(preds[name].logits, k, threshold)
            out[name] = {**metrics_of(preds[name].labels, pred), **open_set_metrics(preds[name].labels, pred, k)}
        out["reject_threshold"] = threshold
    else:
        for name, o in preds.items():
            out[name] = classification_metrics(o.logits, o.labels)
    mix = MixProbe() if "mix" in needs else None
    tgt = forward_split(method, data["tgt_train"], features=bool(needs & _NEEDS_TARGET_FEATURES), mix=mix,
                        shuffle=mix is not None)
    # the validators get target train's predictions and features, never its labels; the labels give only the
    # transductive accuracy, ``tgt_train`` (many DA papers report it; the quality of the pseudo-labels a
    # self-training method starts from: results/digits_hard), which no selection rule reads
    out["tgt_train_unsup"] = unsupervised_scores(tgt.logits, tgt.features, preds["src_val"], tgt.mix, validators)
    if label_set is not None and label_set.has_unknown:
        pred = open_predictions(tgt.logits, label_set.num_known, out["reject_threshold"])
        out["tgt_train"] = {**metrics_of(tgt.labels, pred), **open_set_metrics(tgt.labels, pred, label_set.num_known)}
    else:
        out["tgt_train"] = classification_metrics(tgt.logits, tgt.labels)
    method.train(was_training)
    return out


def display_scalars(ev: dict[str, Any]) -> dict[str, float]:
    """An evaluation point as the scalars people read (TensorBoard): the labeled splits' metrics in
    percent, as every table shows them (records keep fractions), and the label-free scores under
    names that say their sign -- pytorch-adapt's ``entropy`` score is the NEGATIVE mean entropy
    (higher is better, what a selection rule maximises), logged as ``neg_entropy`` beside the
    entropy itself (``entropy``, >= 0); the same for the risks (:data:`NEGATED_SCORES`: ``dev``
    is recorded as -DEV, logged as ``neg_dev`` and ``dev``)."""
    out = {f"{split}/{m}": 100.0 * v for split in LABELED_SPLITS for m, v in ev.get(split, {}).items()}
    for name, v in ev.get("tgt_train_unsup", {}).items():
        if name in NEGATED_SCORES and v is not None:
            out[f"tgt_train_unsup/neg_{name}"] = v
            out[f"tgt_train_unsup/{name}"] = -v
        else:
            out[f"tgt_train_unsup/{name}"] = v
    return out
