"""Test-time BatchNorm: normalise with the test batch's statistics, no gradient step."""

from __future__ import annotations

from .base import register
from .test_time import TestTimeMethod


@register("bn_adapt")
class BNAdapt(TestTimeMethod):
    """Test-time BN (Nado et al. 2020, "Evaluating prediction-time batch normalization for
    robustness under covariate shift"; Schneider et al., NeurIPS 2020, "Improving robustness
    against common corruptions by covariate shift adaptation"): every BatchNorm layer normalises
    with the mean and variance of the test batch it sees instead of the source running statistics,

        BN(x) = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta,   mu_B, sigma_B^2 over the test batch,

    and no weight changes. Schneider et al.'s prior (mixing source and test statistics with weight
    N / (N + n)) is its N = 0 case, the one used here (Nado et al.'s prediction-time BN). Unlike
    AdaBN (arch_mod), which re-estimates statistics over the whole target training set offline,
    this sees one stream batch at a time: with small or class-sorted batches the statistics are
    those of a few classes (the failure the TTA benchmark's streams show)."""

    display = "BN adapt"
    needs_batchnorm = "it normalises with the test batch's BatchNorm statistics"
    paper = ("Schneider et al., Improving robustness against common corruptions by covariate shift adaptation, "
             "NeurIPS 2020. https://arxiv.org/abs/2006.16971")  # and Nado et al. 2020 (see the docstring)
    known_failure = {"closed": ("class-sorted streams: each batch holds one or two classes, so its statistics are "
                                "those classes' and the online accuracy falls below the source model's (56.0 vs "
                                "58.8 at batch 64, 4 pairs x 3 seeds, results/tta) with no gradient step at all: the "
                                "label-shift failure of test-batch BatchNorm (Gong et al. 2022; Niu et al. 2023), "
                                "which TENT, SAR and CoTTA inherit")}
    adapts_weights = False
