"""The source model on a test-time stream, unchanged: the baseline every TTA method must beat."""

from __future__ import annotations

from .base import TargetData, register
from .test_time import TestTimeMethod


@register("no_adapt")
class NoAdapt(TestTimeMethod):
    """The source model scored on the stream as it is: eval-mode BatchNorm with the SOURCE running
    statistics, no update. Its online accuracy is the source model's accuracy on the stream's
    samples (the order cannot change it), and its final model is the source model: the TTA table's
    baseline row (the same network ``source_only`` hands over, so the same numbers on target test)."""

    display = "Source model (no adaptation)"
    paper = "Baseline: the source model, not adapted."
    target_data = TargetData.NONE  # it never looks at a target sample: the stream only scores it
    batch_statistics = False
    adapts_weights = False
