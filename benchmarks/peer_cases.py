"""Peer equivalence, what is compared: each dalab method (and setting) against the pytorch-adapt
adapter that implements it (:data:`CASES`), how that adapter is configured and, where dalab
deliberately differs, the documented deviation; and, for methods the library lacks, where their
objective is checked by hand instead (:data:`HAND_CHECKED`).

A new comparison is one :class:`Case` here (and, for a new kind of peer, a ``peer_<name>`` in
:mod:`dalab.benchmarks.peer_adapters`); tests/test_peer_equivalence.py and results/peer_equivalence.md
pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dalab.benchmarks.peer_adapters import (Peer, peer_adda, peer_afn, peer_aligner, peer_bnm, peer_cdan,
                                            peer_classifier, peer_dann, peer_entropy, peer_finetuner, peer_mcc,
                                            peer_mcd)


@dataclass(frozen=True)
class Case:
    """One comparison: dalab ``method`` with ``overrides`` against the peer ``build``s."""

    method: str
    peer_class: str                       # what the report names
    build: Callable[..., Peer]
    setup: str                            # how pytorch-adapt is configured (set-up only)
    overrides: dict = field(default_factory=dict)
    label: str = "defaults"               # which dalab setting this row is
    # a documented difference of this setting, and the overrides that remove it (None: matches)
    deviation: str | None = None
    removed_by: dict | None = None
    peer_kwargs: dict = field(default_factory=dict)
    backbones: tuple[str, ...] = ("lenet", "lenet_bn")
    # what a step is fed: "uda" (labeled source + unlabeled target), "source" (labeled source only),
    # "target_labeled" (labeled target only; pytorch-adapt's Classifier gets it as its "src" batch)
    data: str = "uda"
    # whether dalab forwards several domains through the backbone at once (bn_mode applies); ADDA
    # forwards source through the frozen source encoder and target through M_t, one domain each
    pools_domains: bool = True

    @property
    def bn_mode_applies(self) -> bool:
        return self.data == "uda" and self.pools_domains


SUM_W = "SumWeighter with dalab's weights"
CASES: list[Case] = [
    Case("dann", "adapters.DANN (DANNHook)", peer_dann,
         f"{SUM_W} (domain terms trade_off/2 each: dalab averages the two domain BCEs); GRL weight = "
         "dalab's lambda_p each step; domain labels source=1"),
    Case("dann", "adapters.DANN + hooks.BSPHook (post_g)", peer_dann,
         f"{SUM_W}, bsp_loss weight = bsp; BSPHook(BatchSpectralLoss(k=bsp_k)) on source and target features",
         overrides={"bsp": 1e-2}, label="bsp=0.01"),
    Case("cdan", "adapters.CDANNE (CDANNEHook)", peer_cdan,
         f"{SUM_W}; GRL weight = lambda_p; feature_combiner = dalab's RandomizedDotProduct; entropy weights "
         "normalised to sum to the batch size; softmax detached in the map"),
    Case("cdan", "adapters.CDANNE (CDANNEHook)", peer_cdan,
         f"{SUM_W}; GRL weight = lambda_p; pytorch-adapt's own CDAN+E: weights / max, gradient through the softmax",
         label="vs pytorch-adapt's CDAN+E defaults",
         deviation="pytorch-adapt's CDAN+E divides the entropy weights by their max (the CDAN code and TLlib: "
                   "by their sum) and back-propagates the reversed domain gradient through softmax(logits) "
                   "into the classifier (the CDAN code and TLlib detach it)",
         peer_kwargs={"paper_setup": False}, backbones=("lenet",)),
    Case("mcc", "adapters.Classifier + hooks.MCCHook", peer_mcc, f"{SUM_W}; MCCLoss(T=temperature)"),
    Case("bnm", "adapters.Classifier + hooks.BNMHook", peer_bnm, SUM_W),
    Case("im", "adapters.Classifier + hooks.TargetEntropyHook + TargetDiversityHook", peer_entropy, SUM_W),
    Case("entropy_min", "adapters.Classifier + hooks.TargetEntropyHook", peer_entropy, SUM_W),
    Case("afn", "adapters.Classifier + hooks.AFNHook (fixed-radius loss_fn)", peer_afn,
         f"{SUM_W}: afn_loss weight trade_off; loss_fn = (mean norm - radius)^2 (the paper's HAFN)"),
    Case("afn", "adapters.Classifier + hooks.AFNHook (AdaptiveFeatureNorm)", peer_afn,
         f"{SUM_W}: afn_loss weight trade_off; AdaptiveFeatureNorm(step_size=delta_r)",
         overrides={"variant": "safn"}, label="variant=safn"),
    Case("afn", "adapters.Classifier + hooks.AFNHook (per-sample loss_fn)", peer_afn,
         f"{SUM_W}: afn_loss weight trade_off/2 (one mean over S u T is half the hook's sum of the domain "
         "means); loss_fn = mean of (||h|| - radius)^2 per sample", overrides={"reduction": "sample"},
         label="reduction=sample (dalab before 74961f4)"),
    Case("dan", "adapters.Aligner (AlignerHook per head layer, MMDLoss)", peer_aligner,
         f"{SUM_W}; softmax=False (dalab aligns raw logits); dalab's MMDLoss (5 kernels, quadratic)"),
    Case("deep_coral", "adapters.Aligner (AlignerHook on logits, CORALLoss)", peer_aligner,
         f"{SUM_W}; softmax=False"),
    Case("joint", "adapters.Aligner (AlignerHook on features, MMDLoss)", peer_aligner,
         f"{SUM_W}; budget 0 (no target labels)"),
    Case("source_only", "adapters.Classifier", peer_classifier, "defaults (one loss term)", data="source"),
    Case("target_only", "adapters.Classifier", peer_classifier,
         "defaults; the labeled target batch given as its \"src\" batch", data="target_labeled"),
    Case("finetune", "adapters.Classifier", peer_classifier,
         "G's optimizer at lr x backbone_lr_mult (Optimizers multipliers); the labeled target batch as "
         "\"src\" (pytorch-adapt's Finetuner would freeze G: that is frozen_features)", data="target_labeled"),
    Case("frozen_features", "adapters.Finetuner", peer_finetuner,
         "optimizer for C only (G frozen, in eval mode); the labeled target batch as \"src\"",
         data="target_labeled"),
    Case("mcd", "adapters.MCD (MCDHook)", peer_mcd,
         "x_weighter and y_weighter SumWeighter (the paper sums each step's terms); repeat = num_k; "
         "C = a module returning [C1(f), C2(f)]; G's optimizer at backbone_lr_mult"),
    Case("adda", "adapters.ADDA (ADDAHook)", peer_adda,
         "threshold -1 (T stepped every batch, as the paper; pytorch-adapt's default 0.6 is dalab's "
         "d_threshold option); optimizers T (at backbone_lr_mult) and D; domain labels source=1",
         pools_domains=False),
    Case("arch_mod", "adapters.Finetuner", peer_finetuner,
         "optimizer for C only (G frozen, in eval mode): the training step on source (budget 0); the new "
         "head is arch_mod's bottleneck with BatchNorm", data="source"),
]

# methods with no pytorch-adapt counterpart: where their objective is checked instead
HAND_CHECKED = {
    "mdd": "no MDD in pytorch-adapt 0.0.83; the disparity and the full update (GRL on the adversarial head "
           "only, F's predictions constant) are checked by hand in tests/test_method_losses.py "
           "(test_mdd_disparity_by_hand, test_mdd_full_update_by_hand)",
    "joint": "with target labels (budget k/all) the labeled-target CE is checked by hand in "
             "tests/test_method_losses.py (test_joint_labeled_update_by_hand); budget 0 is compared above",
    "entropy_min": "the full update is also checked by hand in tests/test_method_losses.py "
                   "(test_entropy_min_update_by_hand)",
    "shot": "no SHOT in pytorch-adapt 0.0.83; the pseudo-label refresh (weighted-centroid clustering, as the "
            "authors' obtain_label) and the full update (IM + beta x CE, hypothesis frozen) are checked by hand "
            "in tests/test_method_losses.py (test_shot_refresh_and_update_by_hand)",
    "self_ensembling": "no counterpart in pytorch-adapt 0.0.83; the EMA teacher (against the student's parameter "
                       "history) and the masked, class-balanced consistency loss are checked by hand in "
                       "tests/test_new_methods.py (test_self_ensembling_teacher_is_the_ema_of_the_student, "
                       "test_self_ensembling_loss_masks_and_balances); not yet the full update",
    "adamatch": "no counterpart in pytorch-adapt 0.0.83; the relative threshold, distribution alignment and "
                "mu ramp are checked by hand in tests/test_new_methods.py (test_adamatch_*); not yet the "
                "full update",
    "arch_mod": "its AdaBN step after training (torch's update_bn; pytorch-adapt's AdaBN needs domain-specific "
                "BatchNorm layers) is checked by hand in tests/test_method_losses.py "
                "(test_arch_mod_adabn_statistics_by_hand)",
    "pada": "no PADA in pytorch-adapt 0.0.83; the class weights (target predictions averaged, max-normalised) and "
            "the update's weighted losses (source CE and source domain term weighted by gamma_y, target term "
            "unweighted; zero-weight classes do not reach the gradient) are checked by hand in "
            "tests/test_labelset_methods.py (test_pada_*); the rest of the update is DANN's",
    "osbp": "no OSBP in pytorch-adapt 0.0.83; the adversarial BCE of p(unknown) against t and the full update (the "
            "target term reversed into the backbone only) are checked by hand in tests/test_labelset_methods.py "
            "(test_osbp_adversarial_term_is_bce_of_p_unknown_against_t, "
            "test_osbp_update_reverses_the_target_gradient_into_the_backbone_only)",
    "ovanet": "no OVANet in pytorch-adapt 0.0.83; the hard-negative OVA loss, the open-set entropy, the update's "
              "terms on the source and target parts, and predict's decision rule are checked by hand in "
              "tests/test_labelset_methods.py (test_ova_loss_*, test_open_entropy_*, test_ovanet_*)",
    # multi-source and domain generalization (issue 25): pytorch-adapt 0.0.83 has none of them
    "m3sda": "no M3SDA in pytorch-adapt 0.0.83; the k+1-domain moment distance (about the mean or the origin) is "
             "checked by hand in tests/test_multidomain_methods.py (test_m3sda_moment_distance_by_hand, "
             "test_m3sda_central_moments_ignore_a_shared_shift); not yet the full update",
    "ms_dann": "no multi-source DANN in pytorch-adapt 0.0.83; its (k+1)-way domain classifier (width, initial "
               "cross-entropy near log(k+1)) in tests/test_multidomain_methods.py "
               "(test_adversarial_domain_classifiers_see_every_domain); not yet the full update",
    "dann_dg": "no DANN for domain generalization in pytorch-adapt 0.0.83; its k-way domain classifier over the "
               "sources (width, initial cross-entropy near log k) in tests/test_multidomain_methods.py "
               "(test_adversarial_domain_classifiers_see_every_domain); not yet the full update",
    "mdan": "no MDAN in pytorch-adapt 0.0.83; the soft and hard combinations with the soft one's gradient weights, "
            "and a full step's loss from the per-source binary classifiers, are checked by hand in "
            "tests/test_multidomain_methods.py (test_mdan_*)",
    "dg_coral": "no DG-CORAL in pytorch-adapt 0.0.83 (its CORALLoss is source-vs-target); the pairwise mean and "
                "covariance penalty is checked by hand in tests/test_multidomain_methods.py "
                "(test_dg_coral_penalty_by_hand); not yet the full update",
    "irm": "no IRM in pytorch-adapt 0.0.83; the penalty (the squared gradient of the risk at a dummy scale 1) is "
           "checked by hand in tests/test_multidomain_methods.py (test_irm_penalty_by_hand); not yet the full update",
    "vrex": "no V-REx in pytorch-adapt 0.0.83; the full update's loss (mean risk + beta x the variance of the "
            "per-domain risks, the anneal and the division by beta) is checked by hand in "
            "tests/test_multidomain_methods.py (test_vrex_penalty_is_the_variance_of_the_per_domain_risks)",
    "groupdro": "no GroupDRO in pytorch-adapt 0.0.83; the exponentiated-gradient domain weights after a step are "
                "checked by hand in tests/test_multidomain_methods.py "
                "(test_groupdro_weights_move_toward_the_worst_domain)",
    "mixstyle": "no MixStyle in pytorch-adapt 0.0.83; the mixed feature statistics, the partner from another "
                "domain and the plain network outside training are checked by hand in "
                "tests/test_multidomain_methods.py (test_mixstyle_mixes_statistics_across_domains_and_only_in_training)",
    # test-time adaptation (issue 26): none in pytorch-adapt 0.0.83
    "no_adapt": "no test-time methods in pytorch-adapt 0.0.83; a step changes no weight and the final model is the "
                "source model, in tests/test_test_time.py (test_methods_without_updates_change_nothing, "
                "test_no_adapt_is_the_source_model_whatever_the_order)",
    "bn_adapt": "no test-time methods in pytorch-adapt 0.0.83; a step changes no weight, the predictions use the "
                "test batch's statistics, in tests/test_test_time.py (test_methods_without_updates_change_nothing, "
                "test_batch_statistics_change_with_the_order_and_episodic_resets_each_batch)",
    "tent": "no TENT in pytorch-adapt 0.0.83; only the BatchNorm affine parameters change, and an episodic reset "
            "restores the source model, in tests/test_test_time.py "
            "(test_tent_and_sar_change_only_the_batchnorm_affine_parameters, "
            "test_batch_statistics_change_with_the_order_and_episodic_resets_each_batch); not yet the loss by hand",
    "sar": "no SAR in pytorch-adapt 0.0.83; only the BatchNorm affine parameters change, the model recovery on "
           "collapse and the skipped step without reliable samples, in tests/test_test_time.py "
           "(test_tent_and_sar_*, test_sar_*); not yet the sharpness-aware step by hand",
    "cotta": "no CoTTA in pytorch-adapt 0.0.83; the stochastic restore and the augmentation-averaged pseudo-labels "
             "in tests/test_test_time.py (test_cotta_restores_to_the_source_and_averages_augmented_views); not yet "
             "the full update",
}
