"""Model-selection rules: the one registry that tables, specs, CLI help and the README read.

A rule picks one evaluation point (checkpoint) of a run from what was recorded at that point;
reported numbers are always the target-TEST headline metric at the picked checkpoint (accuracy; on
label-set tasks the setting's metric, :data:`dalab.tasks.HEADLINE`). The same rule picks
among hyperparameter trials (dalab.tables). A rule that reads target labels is an ORACLE: an upper
bound for model selection, never an unsupervised-adaptation result; every table and figure says so.

Add a rule by adding one :class:`Rule` to :data:`RULES` (its name is written only there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Rule:
    name: str
    display: str                       # short name for tables and figures
    description: str                   # one line: what it picks
    needs_target_labels: bool          # True: an oracle (reads target-validation labels)
    # (evaluation point, the task's headline metric) -> score; the highest wins (ties: later step)
    score: Callable[[dict, str], float]
    # True: the rule takes a run's LAST point (no early stopping); its score only chooses among a
    # search's trials (DomainBed's oracle: target validation at the last checkpoint of each run)
    at_last: bool = False
    # True: the rule's score is not recorded in the run but read from OTHER runs (attach_held_out): a
    # grid that does not train them leaves it unavailable; kept out of the rules a spec runs by default
    other_runs: bool = False

    @property
    def label(self) -> str:
        """Display name, with ORACLE written out where the rule reads target labels."""
        return f"{self.display} (ORACLE: target labels)" if self.needs_target_labels else self.display

    @property
    def text(self) -> str:
        """The description, prefixed by ORACLE for rules that read target labels."""
        return (f"ORACLE: {self.description} -- uses target labels, an upper bound, not a UDA result"
                if self.needs_target_labels else f"{self.description} (no target labels)")


def _unsup(key: str) -> Callable[[dict, str], float]:
    """The recorded label-free score ``key``; NaN where the point lacks it (a record written before
    that validator existed, or a score stored as null): such a point is not available to the rule,
    as a non-finite score is not."""
    def score(ev: dict, metric: str) -> float:
        v = (ev.get("tgt_train_unsup") or {}).get(key)
        return float("nan") if v is None else v
    return score


def _src_val(ev: dict, metric: str) -> float:
    return ev["src_val"]["acc"]  # source validation has no unknown class: accuracy in every setting


_RULES = (
    Rule("last", "Last", "last checkpoint of the fixed step budget", False, _src_val, at_last=True),
    Rule("src_val", "Source val", "best source-validation accuracy", False, _src_val),
    Rule("im", "IM", "best information-maximisation score on unlabeled target train", False, _unsup("im")),
    Rule("entropy", "Entropy", "lowest prediction entropy on unlabeled target train", False, _unsup("entropy")),
    Rule("snd", "SND", "best soft-neighbourhood density on unlabeled target train", False, _unsup("snd")),
    Rule("bnm", "BNM", "largest nuclear norm of the target-train prediction matrix (BNM; Cui et al. 2020)",
         False, _unsup("bnm")),
    Rule("class_ami", "ClassAMI", "best agreement (adjusted mutual information) of predicted classes with k-means "
         "clusters of target-train features (Musgrave et al. 2022)", False, _unsup("class_ami")),
    Rule("v_measure", "V-measure", "best agreement (V-measure) of predicted classes with k-means clusters of "
         "target-train features (Ericsson et al. 2023)", False, _unsup("v_measure")),
    Rule("dev", "DEV", "lowest deep-embedded-validation risk: source-val loss weighted by a domain classifier on "
         "features, with a control variate (You et al. 2019; recorded as -risk)", False, _unsup("dev")),
    Rule("devn", "DEVN", "lowest DEV risk with max-normalised weights (Musgrave et al. 2022; recorded as -risk)",
         False, _unsup("devn")),
    Rule("iwv", "IWV", "lowest importance-weighted source-val loss (Sugiyama et al. 2007; DEV without the "
         "control variate; recorded as -risk)", False, _unsup("iwv")),
    Rule("mixval", "MixVal", "best accuracy on mixed target-train samples against their mixed pseudo-labels "
         "(Hu et al. 2023)", False, _unsup("mixval")),
    Rule("lodo", "LODO CV", "best leave-one-domain-out validation accuracy: the same method, setting and seed "
         "retrained with each training domain held out in turn, scored on that domain's validation split at the same "
         "step, mean over the held-out domains (DomainBed's leave-one-domain-out cross-validation; k more runs per "
         "task, a spec's leave_one_out_cv)", False, lambda ev, metric: ev.get(HELD_OUT, float("nan")), other_runs=True),
    Rule("oracle", "Oracle", "best target-validation accuracy (the setting's metric)", True,
         lambda ev, metric: ev["tgt_val"][metric]),
    Rule("oracle_last", "Oracle (last)", "last checkpoint; among a search's trials, the best target-validation "
         "accuracy there (DomainBed's test-domain validation: no early stopping on target data)", True,
         lambda ev, metric: ev["tgt_val"][metric], at_last=True),
)
RULES: dict[str, Rule] = {r.name: r for r in _RULES}
DEFAULT_RULES: tuple[str, ...] = tuple(r.name for r in _RULES if not r.other_runs)  # a spec's default selection
RULE_NAMES: tuple[str, ...] = tuple(RULES)


HELD_OUT = "lodo"  # the key attach_held_out adds to an evaluation point


def _config_key(cfg: dict) -> str:
    """A run's config without its task (source, target): what its validation runs share with it."""
    import json

    return json.dumps({k: v for k, v in cfg.items() if k not in ("source", "target")}, sort_keys=True)


def attach_held_out(records: list[dict]) -> list[dict]:
    """``records`` with the ``lodo`` rule's score added to each evaluation point of every run whose
    validation runs (dalab.tasks.held_out_tasks: the same config with one source domain held out as
    the target, for each source) are among ``records``: the mean, over the held-out domains, of their
    target-validation accuracy at the same step. A run lacking any of them, or a point lacking their
    step, gets nothing (the rule is not available there). The records given are not modified."""
    from dalab.tasks import held_out_tasks

    index = {(_config_key(r["config"]), r["config"]["source"], r["config"]["target"]): r for r in records}
    out = []
    for r in records:
        tasks = held_out_tasks(r["config"]["source"])
        inner = [index.get((_config_key(r["config"]), s, t)) for s, t in tasks]
        if not tasks or any(x is None or x.get("status") != "done" for x in inner):
            out.append(r)
            continue
        by_step = [{e["step"]: e["tgt_val"]["acc"] for e in x.get("evals") or []} for x in inner]
        out.append({**r, "evals": [_with_held_out(e, by_step) for e in r.get("evals") or []],
                    **({"final": _with_held_out(r["final"], by_step)} if r.get("final") else {})})
    return out


def _with_held_out(ev: dict, by_step: list[dict[int, float]]) -> dict:
    """An evaluation point with the mean of the validation runs' accuracies at its step (unchanged
    when one of them has no point there)."""
    accs = [b.get(ev["step"]) for b in by_step]
    return ev if any(a is None for a in accs) else {**ev, HELD_OUT: sum(accs) / len(accs)}


def get_rule(name: str) -> Rule:
    from dalab.utils import DalabError

    if name not in RULES:
        from dalab.datasets.base import closest
        raise DalabError(f"unknown selection rule {name!r}{closest(name, RULES)}; allowed: {', '.join(RULES)}")
    return RULES[name]


def markdown() -> str:
    """The README's selection-rule table."""
    lines = ["| rule | picks the checkpoint with | target labels |", "|---|---|---|"]
    for r in RULES.values():
        lines.append(f"| `{r.name}` | {r.description} | {'**yes: oracle**' if r.needs_target_labels else 'no'} |")
    return "\n".join(lines)


def selection_score(ev: dict, rule: str, metric: str = "acc") -> float:
    """What ``rule`` maximises at evaluation point ``ev`` of a run whose headline metric is ``metric``."""
    return RULES[rule].score(ev, metric)


def select(record: dict, rule: str) -> dict | None:
    """The evaluation point a rule picks in one run, or None (a diverged run, no evaluation at all,
    or no point with a finite score: e.g. a record written before the rule's validator existed).
    Ties go to the later checkpoint."""
    evals = record.get("evals") or []
    if record.get("status") != "done":  # diverged (or unfinished): marked † under every rule
        return None
    if RULES[rule].at_last:
        return evals[-1] if evals else None
    from dalab.tasks import headline

    metric = headline(record)
    finite = [e for e in evals if math.isfinite(selection_score(e, rule, metric))]
    if not finite:
        return None
    return max(reversed(finite), key=lambda e: selection_score(e, rule, metric))


# A run "at chance" finished (did not diverge) but never learned its source task: its final
# source-validation accuracy is at most chance (1 / number of classes) plus this margin. Such a run
# is kept in the tables (its numbers are real) but marked, and the bench summary names it.
CHANCE_MARGIN = 0.05
CHANCE_MARK = "°"  # in table cells: "°N" = N runs of the cell at chance (LaTeX: $^\circ$)


def at_chance(record: dict, margin: float = CHANCE_MARGIN) -> bool:
    """Whether a finished run's source-validation accuracy at its final point is at most
    1 / num_classes + ``margin`` (a network that never learned the source: e.g. the BatchNorm-free
    ``lenet`` at a short budget). False for diverged runs (marked † instead) and for records that
    do not say how many classes there are."""
    if record.get("status") != "done" or not _learns_source(record):
        return False
    k = ((record.get("data") or {}).get("source") or {}).get("classes")
    final = record.get("final") or ((record.get("evals") or [None])[-1])
    if not k or not final or "src_val" not in final:
        return False
    return final["src_val"]["acc"] <= 1.0 / k + margin


def _learns_source(record: dict) -> bool:
    """Whether the run's network was trained on source labels (it trains with source data, or starts
    from the source model): a target-only run never saw a source image, so its source accuracy says
    nothing. Read from the registry (records before target_only declared ``uses_source = False``
    still say True)."""
    from dalab.methods import METHODS

    m = record.get("method") or {}
    cls = METHODS.get(m.get("name"))
    return bool(m.get("init_from")) or (cls.uses_source if cls is not None else m.get("uses_source", True))


def n_at_chance(records) -> int:
    """How many of ``records`` are :func:`at_chance`."""
    return sum(at_chance(r) for r in records)


CHANCE_NOTE = (f"{CHANCE_MARK}N: N runs of the cell ended with source-validation accuracy at chance "
               f"(≤ 1/classes + {CHANCE_MARGIN * 100:.0f} points; kept in the mean): the network never "
               f"learned the source task.")
