"""Significance for paper tables, from maintained libraries (scipy, scikit-posthocs), not by hand.

- Per cell (one method on one pair) vs the baseline (source-only) on the same pair: a two-sided
  paired t-test over seeds (``scipy.stats.ttest_rel``), the runs paired by seed (same seed = same
  data order and initial weights where the networks agree). With 3 seeds the test has 2 degrees of
  freedom and little power: a gain must be large against seed noise to be flagged, and an
  unflagged cell is not evidence of no difference.
- Across pairs: a Friedman test (``scipy.stats.friedmanchisquare``) with the pairs as blocks and
  the methods as treatments (each block: the methods' mean target accuracy on that pair), then
  the Nemenyi post-hoc test (``scikit_posthocs.posthoc_nemenyi_friedman``), drawn as a
  critical-difference diagram (Demšar, JMLR 2006; ``scikit_posthocs.critical_difference_diagram``).
  With 4 blocks only very large rank differences are significant.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

ALPHA = 0.05
CELL_TEST = f"two-sided paired t-test over seeds, runs paired by seed, scipy.stats.ttest_rel, p < {ALPHA}"
CELL_TEST_SHORT = f"paired t-test over seeds, p < {ALPHA}"   # the table note's wording
# Below these a test is not printed at all (a one-line note says why): with 2 seeds the paired test
# has 1 degree of freedom, and a Friedman test over fewer than 4 blocks can hardly reject anything.
MIN_SEEDS = 3
MIN_BLOCKS = 4


def paired_test(values: dict[int, float], baseline: dict[int, float], alpha: float = ALPHA) -> tuple[float | None, str]:
    """(p-value, mark) of ``values`` vs ``baseline`` (both {seed: accuracy}), paired by seed.
    mark is "↑" (significantly higher), "↓" (lower) or "". p is None with fewer than 2 common seeds;
    NaN when every difference is 0 (identical numbers: never significant)."""
    from scipy import stats

    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None, ""
    a = [values[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(a, b).pvalue)
    if not math.isfinite(p) or p >= alpha:
        return p, ""
    return p, "↑" if sum(a) > sum(b) else "↓"


def friedman(scores: dict[str, Sequence[float]], alpha: float = ALPHA) -> dict | None:
    """Friedman test + Nemenyi post-hoc over blocks. ``scores`` maps a method to its score in each
    block (same block order for all; higher is better). None with fewer than 3 methods or
    :data:`MIN_BLOCKS` blocks.
    Returns {"statistic", "p", "n_blocks", "n_methods", "ranks" (mean rank per method, 1 = best),
    "nemenyi" (DataFrame of pairwise p-values), "alpha"}."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    names = list(scores)
    if len(names) < 3:
        return None
    n_blocks = len(scores[names[0]])
    if n_blocks < MIN_BLOCKS or any(len(v) != n_blocks for v in scores.values()):
        return None
    data = pd.DataFrame({m: list(map(float, scores[m])) for m in names})   # rows: blocks, columns: methods
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.friedmanchisquare(*[data[m].to_numpy() for m in names])
        import scikit_posthocs as sp
        nemenyi = sp.posthoc_nemenyi_friedman(data.to_numpy())
    nemenyi.index = nemenyi.columns = names
    nemenyi = nemenyi.fillna(1.0)
    ranks = data.rank(axis=1, ascending=False).mean(axis=0)               # 1 = best, ties averaged
    return {"statistic": float(res.statistic), "p": float(res.pvalue) if np.isfinite(res.pvalue) else float("nan"),
            "n_blocks": n_blocks, "n_methods": len(names), "ranks": ranks, "nemenyi": nemenyi, "alpha": alpha}
