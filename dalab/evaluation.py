"""What an evaluation point measures: prediction over a split, classification metrics on every
labeled split, and label-free scores on target train.

:func:`evaluate` is what the trainer calls at each evaluation point; its result is one entry of a
record's ``evals`` (``src_val`` / ``tgt_val`` / ``tgt_test``: :data:`CLASSIFICATION_METRICS`;
``tgt_train_unsup``: :data:`UNSUPERVISED_SCORES`). Both are registries: a new metric (an open-set
H-score) or a new label-free validator is one entry there, and every later record carries it; the
model-selection rules of :mod:`dalab.selection` read these recorded numbers by name.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

EVAL_BATCH = 256  # cache-friendly on CPU (1024 was 2x slower on LeNet), plenty on a GPU
LABELED_SPLITS = ("src_val", "tgt_val", "tgt_test")  # scored with labels; target train never is


EVAL_ORDER_SEED = 0  # the order in which a batch-dependent model (Method.batch_statistics) sees a split


@torch.inference_mode()
def predict_split(method, split, batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (float32, CPU) and labels of a whole split (in the method's precision); device-side
    results are moved to the host once, at the end. A model whose predictions depend on the batch
    (``Method.batch_statistics``: test-batch BatchNorm statistics) sees the split in a seeded random
    order (:data:`EVAL_ORDER_SEED`), in batches of its stream's batch size: never in the split's
    storage order (mnist5k is stored sorted by class), which would hand it one-class batches."""
    if getattr(method, "batch_statistics", False):
        gen = torch.Generator().manual_seed(EVAL_ORDER_SEED)
        split, batch_size = split.subset(torch.randperm(len(split), generator=gen).numpy()), method.hp.batch_size
    logits, labels = [], []
    for x, y in split.batches(batch_size):
        logits.append(method.predict(x).float())
        labels.append(y)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu().numpy()


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


# label-free validators, higher is better: name -> score of target-train predictions, given as
# {"logits": ..., "preds": softmax(logits)} (pytorch-adapt's form). A selection rule picks by one.
UNSUPERVISED_SCORES: dict[str, Callable[[dict[str, torch.Tensor]], float]] = {
    "im": _pytorch_adapt_validator("IMValidator"),             # Shi & Sha 2012 (pytorch-adapt)
    "entropy": _pytorch_adapt_validator("EntropyValidator"),   # negative entropy (pytorch-adapt)
    "snd": lambda split: snd_score(split["preds"]),            # Saito et al. 2021
}
UNSUPERVISED_VALIDATORS = tuple(UNSUPERVISED_SCORES)


def unsupervised_scores(logits: torch.Tensor) -> dict[str, float]:
    """Every :data:`UNSUPERVISED_SCORES` entry of target-train logits. No target label is touched."""
    split = {"logits": logits, "preds": torch.softmax(logits, 1)}
    return {name: score(split) for name, score in UNSUPERVISED_SCORES.items()}


# --------------------------------------------------------------------------- one evaluation point

def evaluate(method, data: dict, label_set=None) -> dict[str, Any]:
    """Metrics on every labeled split (:data:`LABELED_SPLITS`), label-free scores on target train
    (``data["tgt_train"]``), with the method in eval mode (its mode is restored after). On a task
    whose target has unknown classes (``label_set``: a :class:`dalab.tasks.LabelSet`) the target
    splits also get :func:`open_set_metrics`, of predictions that include "unknown"
    (:func:`open_predictions`), and the point records the rejection threshold a closed-set method used."""
    was_training = method.training
    method.eval()
    out: dict[str, Any] = {}
    preds = {name: predict_split(method, data[name]) for name in LABELED_SPLITS}
    if label_set is not None and label_set.has_unknown:
        k = label_set.num_known
        threshold = None if getattr(method, "open_set", False) else rejection_threshold(preds["src_val"][0])
        out["src_val"] = classification_metrics(*preds["src_val"])
        for name in LABELED_SPLITS[1:]:
            logits, labels = preds[name]
            pred = open_predictions(logits, k, threshold)
            out[name] = {**metrics_of(labels, pred), **open_set_metrics(labels, pred, k)}
        out["reject_threshold"] = threshold
    else:
        for name, (logits, labels) in preds.items():
            out[name] = classification_metrics(logits, labels)
    out["tgt_train_unsup"] = unsupervised_scores(predict_split(method, data["tgt_train"])[0])
    method.train(was_training)
    return out


def display_scalars(ev: dict[str, Any]) -> dict[str, float]:
    """An evaluation point as the scalars people read (TensorBoard): the labeled splits' metrics in
    percent, as every table shows them (records keep fractions), and the label-free scores under
    names that say their sign -- pytorch-adapt's ``entropy`` score is the NEGATIVE mean entropy
    (higher is better, what a selection rule maximises), logged as ``neg_entropy`` beside the
    entropy itself (``entropy``, >= 0)."""
    out = {f"{split}/{m}": 100.0 * v for split in LABELED_SPLITS for m, v in ev.get(split, {}).items()}
    for name, v in ev.get("tgt_train_unsup", {}).items():
        if name == "entropy":
            out["tgt_train_unsup/neg_entropy"] = v
            out["tgt_train_unsup/entropy"] = -v
        else:
            out[f"tgt_train_unsup/{name}"] = v
    return out
