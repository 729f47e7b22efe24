"""Label-free validators that read more than target-train predictions: the math of the scores
:mod:`dalab.evaluation` registers (``UNSUPERVISED_SCORES``) and records at every evaluation point.

Each reads only what an unsupervised-adaptation run may read: target-train predictions, features
and inputs (never a target label), and labeled SOURCE validation data. All are "higher is better":
a risk (DEV, DEVN, IWV) is recorded negated. Cost: ``python -m dalab.validators`` times each on a
random problem of the digits' size.

- BNM (Cui et al., CVPR 2020; as a validator: Musgrave et al. 2022): :func:`bnm_score`.
- ClassAMI (Musgrave et al. 2022) and V-measure (Ericsson et al. 2023): :func:`kmeans_clusters`,
  :func:`cluster_agreement`.
- IWV (Sugiyama et al., JMLR 2007), DEV (You et al., ICML 2019) and DEVN (Musgrave et al. 2022):
  :func:`importance_weights`, :func:`dev_risk`.
- MixVal (Hu et al., NeurIPS 2023): :class:`MixProbe`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

KMEANS_SEED = 0   # k-means initialisation (ClassAMI, V-measure)
DOMAIN_SEED = 0   # the domain classifier's solver (DEV, DEVN, IWV)
MIX_LAMBDA = 0.55  # MixVal's fixed mixing weight (the paper's and its code's default)
MAX_LOG_ODDS = 30.0  # a domain classifier's log-odds are clipped here: weights stay finite (e^30 ~ 1e13)


# --------------------------------------------------------------------------- BNM

def bnm_score(preds: torch.Tensor) -> float:
    """Batch nuclear norm of the N x K softmax prediction matrix P (Cui et al., "Towards
    Discriminability and Diversity: Batch Nuclear-norm Maximization under Label Insufficient
    Situations", CVPR 2020), over the whole split instead of one batch, normalised to [0, 1]:
    ||P||_* / sqrt(N min(N, K)). The bound holds because ||P||_* <= sqrt(rank P) ||P||_F and
    ||P||_F^2 <= N for rows on the simplex; it is reached exactly by confident (one-hot) predictions
    spread evenly over min(N, K) classes. Higher: more confident and more diverse predictions."""
    p = preds.double()
    n, k = p.shape
    return float(torch.linalg.svdvals(p).sum() / np.sqrt(n * min(n, k)))


# --------------------------------------------------------------------------- clustering agreement

def kmeans_clusters(features: torch.Tensor, k: int, seed: int = KMEANS_SEED) -> np.ndarray | None:
    """k-means cluster of each L2-normalised feature vector (scikit-learn, k-means++ with one
    initialisation, fixed seed); None when there are fewer samples than clusters. L2 normalisation
    (a choice, not the papers'): the features' scale changes during training and a few large-norm
    samples would otherwise decide the clusters."""
    from sklearn.cluster import KMeans

    f = torch.nn.functional.normalize(features.float(), dim=1).numpy().astype(np.float64)
    if len(f) < k:
        return None
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(f).labels_


def cluster_agreement(preds: torch.Tensor, clusters: np.ndarray | None, how: str) -> float:
    """Agreement between predicted classes (argmax) and k-means clusters of the features:
    ``ami`` -- adjusted mutual information (ClassAMI; Musgrave et al., "Three New Validators and a
    Large-Scale Benchmark Ranking for Unsupervised Domain Adaptation", 2022); ``v_measure`` -- the
    harmonic mean of homogeneity and completeness (Ericsson et al., "Better Practices for Domain
    Adaptation", AutoML 2023). Both are 1 when predictions and clusters are the same partition.
    NaN without clusters."""
    from sklearn.metrics import adjusted_mutual_info_score, v_measure_score

    if clusters is None:
        return float("nan")
    pred = preds.argmax(1).numpy()
    fn = {"ami": adjusted_mutual_info_score, "v_measure": v_measure_score}[how]
    return float(fn(pred, clusters))


# --------------------------------------------------------------------------- importance weighting

def importance_weights(src_features: torch.Tensor, tgt_features: torch.Tensor,
                       seed: int = DOMAIN_SEED) -> np.ndarray:
    """Density-ratio weights w(x) = p(target | x) / p(source | x) * n_s / n_t of the source samples,
    from a domain classifier on their features (logistic regression, L2, C = 1, on standardised
    features, solved to tol 1e-6: at scikit-learn's default 1e-4 the weights of nearly separable
    domains were off by 2x). E_source[w] = 1 when the classifier is calibrated.

    Deviation from You et al.: they fit the classifier on SOURCE-TRAIN features vs target (an MLP,
    its weight decay chosen on a held-out fifth) and weight source-val; an evaluation point passes
    over source VAL only, so here the classifier is fit on source-val vs target-train features and
    weights the same source-val samples (a linear classifier overfits them little)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xs, xt = src_features.double().numpy(), tgt_features.double().numpy()
    x = StandardScaler().fit_transform(np.concatenate([xs, xt]))
    d = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    with warnings.catch_warnings():  # at max_iter the weights are still usable; no warning per evaluation point
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=1.0, tol=1e-6, max_iter=1000, random_state=seed).fit(x, d)
    log_odds = clf.decision_function(x[:len(xs)])  # log p(target|x) - log p(source|x): no 0/0
    return np.exp(np.clip(log_odds, -MAX_LOG_ODDS, MAX_LOG_ODDS)) * len(xs) / len(xt)


def dev_risk(weights: np.ndarray, losses: np.ndarray, normalize: bool = False,
             control_variate: bool = True) -> float:
    """Importance-weighted risk of per-sample source-validation ``losses``.

    - IWV (Sugiyama, Krauledat & Müller, "Covariate Shift Adaptation by Importance Weighted Cross
      Validation", JMLR 2007): mean(w L) -- ``control_variate=False``.
    - DEV (You, Wang, Long & Jordan, "Towards Accurate Model Selection in Deep Unsupervised Domain
      Adaptation", ICML 2019, Alg. 1): mean(w L) + eta mean(w) - eta with the control variate
      eta = -Cov(w L, w) / Var(w) (E[w] = 1, so the correction has mean zero and cuts the variance).
      Var(w) = 0 (equal weights) gives eta = 0: DEV is then the plain mean loss.
    - DEVN (``normalize``; Musgrave et al. 2022, pytorch-adapt's "max" normalisation): the weights
      divided by their maximum and shifted to mean 1 before DEV.

    Lower is better: callers record the negative."""
    w, loss = np.asarray(weights, np.float64), np.asarray(losses, np.float64)
    if normalize:
        w = w / w.max()
        w = w - w.mean() + 1.0
    wl = w * loss
    if not control_variate:
        return float(wl.mean())
    var_w = w.var(ddof=1) if len(w) > 1 else 0.0
    eta = 0.0 if var_w <= 1e-12 * max(1.0, float(np.mean(w ** 2))) else -np.cov(wl, w)[0, 1] / var_w
    return float(wl.mean() + eta * w.mean() - eta)


# --------------------------------------------------------------------------- MixVal

@dataclass
class MixProbe:
    """MixVal (Hu, Liang, Liew, Xue, Bai & Wang, "Mixed Samples as Probes for Unsupervised Model
    Selection in Domain Adaptation", NeurIPS 2023): target-train inputs are mixed in pairs,
    x = lam x_a + (1 - lam) x_b with lam = :data:`MIX_LAMBDA`, and labeled with the mix of the pair's
    hard pseudo-labels (the model's own predictions); lam > 0.5 makes that label x_a's class. The
    score is the model's accuracy on the mixed samples (ICE): over pairs of one predicted class
    (intra-cluster probes, the neighbourhood density) and of two classes (inter-cluster probes,
    the decision boundary). As in the authors' code, a pair is a sample and its mirror in the same
    evaluation batch (the batch reversed), the split in a seeded random order.

    Deviations: the paper combines the two probes across the candidate models (by their ranks);
    one evaluation point cannot rank, so :meth:`score` is the mean of the two accuracies (skada's
    MixValScorer does the same), or the one that exists. A sample is never paired with itself
    (the middle of an odd batch)."""

    lam: float = MIX_LAMBDA
    hits: list = field(default_factory=list)   # per batch: the model predicts the mixed label (device bools)
    same: list = field(default_factory=list)   # per batch: the pair has one predicted class

    def add(self, predict, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Probe one evaluation batch: ``x`` its inputs, ``logits`` the model's on them; ``predict``
        the model (eval mode). Results stay on the device until :meth:`counts`."""
        n = len(x)
        j = torch.arange(n - 1, -1, -1, device=x.device)
        keep = torch.arange(n, device=x.device) != j
        if not bool(keep.any()):
            return
        pl = logits.argmax(1).to(x.device)
        mixed = self.lam * x[keep] + (1.0 - self.lam) * x[j[keep]]
        label = (pl if self.lam >= 0.5 else pl[j])[keep]
        self.hits.append(predict(mixed).argmax(1) == label)
        self.same.append((pl == pl[j])[keep])

    def counts(self) -> tuple[int, int, int, int]:
        """(intra-cluster hits, intra-cluster probes, inter-cluster hits, inter-cluster probes)."""
        if not self.hits:
            return 0, 0, 0, 0
        hit, same = torch.cat(self.hits).cpu(), torch.cat(self.same).cpu()
        return int(hit[same].sum()), int(same.sum()), int(hit[~same].sum()), int((~same).sum())

    def score(self) -> float:
        """Mean of the intra- and inter-cluster accuracies present (NaN without any probe)."""
        ih, i, eh, e = self.counts()
        parts = [h / n for h, n in ((ih, i), (eh, e)) if n]
        return float(np.mean(parts)) if parts else float("nan")


# --------------------------------------------------------------------------- cost

def timings(n_tgt: int = 3500, n_src: int = 1000, dim: int = 100, k: int = 10, seed: int = 0) -> dict[str, float]:
    """CPU seconds (one thread, as a bench worker runs) of each validator and of the shared pieces
    it needs, on a random problem: ``n_tgt`` target-train and ``n_src`` source-val samples,
    ``dim``-d features, ``k`` classes. MixVal's cost is not here: it is one more forward pass of the
    model over target train."""
    from threadpoolctl import threadpool_limits

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tgt, k, generator=g) * 3
    preds = torch.softmax(logits, 1)
    ft, fs = torch.randn(n_tgt, dim, generator=g).relu(), torch.randn(n_src, dim, generator=g).relu() + 0.1
    src_logits, src_labels = torch.randn(n_src, k, generator=g) * 3, torch.randint(0, k, (n_src,), generator=g)
    out: dict[str, float] = {}

    def timed(name, fn):
        t = time.process_time()
        r = fn()
        out[name] = time.process_time() - t
        return r

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            timed("bnm", lambda: bnm_score(preds))
            clusters = timed("kmeans (shared: class_ami, v_measure)", lambda: kmeans_clusters(ft, k))
            timed("class_ami", lambda: cluster_agreement(preds, clusters, "ami"))
            timed("v_measure", lambda: cluster_agreement(preds, clusters, "v_measure"))
            w = timed("domain classifier (shared: dev, devn, iwv)", lambda: importance_weights(fs, ft))
            loss = torch.nn.functional.cross_entropy(src_logits, src_labels, reduction="none").numpy()
            timed("dev", lambda: dev_risk(w, loss))
            timed("devn", lambda: dev_risk(w, loss, normalize=True))
            timed("iwv", lambda: dev_risk(w, loss, control_variate=False))
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dalab.validators", description=timings.__doc__)
    ap.add_argument("--n-tgt", type=int, default=3500)
    ap.add_argument("--n-src", type=int, default=1000)
    ap.add_argument("--dims", default="100,768", help="comma-separated feature sizes (digits' lenet: 768)")
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args(argv)
    for dim in (int(d) for d in args.dims.split(",")):
        timings(args.n_tgt, args.n_src, dim, args.classes)  # warm-up: imports, first BLAS calls
        t = timings(args.n_tgt, args.n_src, dim, args.classes)
        print(f"{args.n_tgt} target x {args.n_src} source-val samples, {dim}-d features, {args.classes} classes:")
        for name, s in t.items():
            print(f"  {name:<44} {s * 1000:8.1f} ms CPU")
        print(f"  {'total':<44} {sum(t.values()) * 1000:8.1f} ms CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
