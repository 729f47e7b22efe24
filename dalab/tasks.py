"""A task: source domain -> target domain, and the label sets the two sides have.

Every run adapts on a task. Its label-set split says which classes both domains share, which only
the source has (source-private: partial and universal DA) and which only the target has
(target-private: the "unknown" classes of open-set and universal DA). :class:`LabelSet` is that
split, defined here once; the setting follows from it:

========== ======================== ========================= ===============================
setting    source-private classes   target-private classes    headline metric
========== ======================== ========================= ===============================
closed     none                     none                      accuracy
partial    some                     none                      per-class accuracy (target's)
openset    none                     some ("unknown")          H-score
universal  some                     some ("unknown")          H-score
========== ======================== ========================= ===============================

Closed-set is the case with nothing private: its runs carry no label set at all (``classes`` is
None in :class:`~dalab.runs.RunConfig`), so closed-set run ids and records are what they always were.

Labels inside a run: the model's classes are the SOURCE classes, shared first, then source-private,
numbered 0..K-1 (:attr:`LabelSet.source_classes`); a target sample of a shared class gets that
class's number, a target-private sample gets K ("unknown"). Target labels never reach a method's
batch (the trainer drops them), and on tasks with unknown target classes no labeled target budget
is allowed, so label K never reaches a method at all.

The named splits of the offline digits benchmark are declared once, beside ``DEFAULT_PAIRS``, in
:data:`dalab.datasets.pairs.LABEL_SETS`.

The source side (issue 25): a task has one source domain or several. ``RunConfig.source`` names
them, joined by :data:`SOURCE_SEP` in the task's order (``mnist5k+syndigits+ucidigits``); the
order is the source domains' index ``0..k-1`` (``Batch.d_src``), so it is part of the run's
identity. :func:`source_domains` is the one reader of that field and :func:`check_sources` its one
check (no duplicate, the target not among them). A single-source task's ``source`` is the one
domain's name, as it always was: its run ids and records are unchanged, and its pair name is
``source→target``; a multi-source task's pair name is ``a+b+c→target`` (dalab.display.pair_name).
A multi-source run samples per-domain balanced batches: every step draws ``batch_size`` samples
from EACH source domain (the hyperparameter is a batch size per domain; DomainBed's convention),
concatenated in source order; a method that ignores ``d_src`` trains on the pooled batch (the
"merged sources" baseline), and ``source_only`` there is DomainBed's ERM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from dalab.utils import DalabError

SETTINGS: dict[str, str] = {
    "closed": "source and target share every class",
    "partial": "the target has a subset of the source's classes (Cao et al., ECCV 2018)",
    "openset": "the target also has classes the source never saw, scored as one 'unknown' class "
               "(Saito et al., ECCV 2018)",
    "universal": "both sides have private classes; the target's are 'unknown' (You et al., CVPR 2019)",
}
# the metric a setting's tables report (a key of an evaluation point's split metrics), and its name
HEADLINE: dict[str, tuple[str, str]] = {
    "closed": ("acc", "accuracy"),
    "partial": ("bal_acc", "per-class accuracy over the target's classes"),
    "openset": ("h_score", "H-score (harmonic mean of OS* and UNK)"),
    "universal": ("h_score", "H-score (harmonic mean of OS* and UNK)"),
}
# a metric's short name (figure axes, CSV columns): key of HEADLINE's first element -> name
METRIC_SHORT: dict[str, str] = {"acc": "accuracy", "bal_acc": "per-class accuracy", "h_score": "H-score"}
ROLES = ("shared", "source_private", "target_private")


def metric_names(settings) -> tuple[str, str]:
    """(long, short) name of the headline metric of tables holding ``settings`` (one name when they
    share it, else "headline metric ..." naming each)."""
    keys = list(dict.fromkeys(HEADLINE[s][0] for s in settings)) or ["acc"]
    if len(keys) == 1:
        return next(HEADLINE[s][1] for s in HEADLINE if HEADLINE[s][0] == keys[0]), METRIC_SHORT[keys[0]]
    both = " / ".join(METRIC_SHORT[k] for k in keys)
    return f"headline metric of each row's setting ({both})", "headline metric"


@dataclass(frozen=True)
class LabelSet:
    """Class indices (into the domains' common class list) on each side of a task."""

    shared: tuple[int, ...]
    source_private: tuple[int, ...] = ()
    target_private: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for role in ROLES:
            object.__setattr__(self, role, tuple(sorted(int(c) for c in getattr(self, role))))
        if not self.shared:
            raise DalabError("the label set has no shared class: source and target must share at least one class "
                             "(give --classes SHARED:SOURCE_PRIVATE:TARGET_PRIVATE with a non-empty SHARED)")
        seen: dict[int, str] = {}
        for role in ROLES:
            for c in getattr(self, role):
                if c in seen:
                    raise DalabError(f"class {c} is in two sets ({seen[c]} and {role}); each class belongs to one of "
                                     f"shared, source_private, target_private")
                seen[c] = role

    # -- what it is
    @property
    def setting(self) -> str:
        return {(False, False): "closed", (True, False): "partial", (False, True): "openset",
                (True, True): "universal"}[(bool(self.source_private), bool(self.target_private))]

    @property
    def source_classes(self) -> tuple[int, ...]:
        """The model's classes, in the order of its outputs 0..K-1: shared, then source-private."""
        return self.shared + self.source_private

    @property
    def num_known(self) -> int:
        """K: the number of source classes (a target label K means "unknown")."""
        return len(self.source_classes)

    @property
    def has_unknown(self) -> bool:
        return bool(self.target_private)

    # -- how a run stores it
    def key(self) -> dict[str, list[int]]:
        """The run config's ``classes``."""
        return {role: list(getattr(self, role)) for role in ROLES}

    @classmethod
    def from_key(cls, key: Mapping[str, Sequence[int]]) -> "LabelSet":
        bad = sorted(set(key) - set(ROLES))
        if bad:
            raise DalabError(f"unknown label-set field(s) {', '.join(bad)}; use {', '.join(ROLES)}")
        return cls(**{role: tuple(_ints(key.get(role, ()), role)) for role in ROLES})

    def text(self) -> str:
        """``SHARED:SOURCE_PRIVATE:TARGET_PRIVATE`` with ranges (``0-4::5-9``), as ``--classes`` takes it."""
        return ":".join(_ranges(getattr(self, role)) for role in ROLES)

    # -- checks against the domains, and the labels a run uses
    def check(self, classes: Sequence[str]) -> None:
        """DalabError unless every index names one of the domains' ``classes``."""
        n = len(classes)
        out = [c for role in ROLES for c in getattr(self, role) if not 0 <= c < n]
        if out:
            raise DalabError(f"class index {out[0]} does not exist: the domains have {n} classes (0-{n - 1}); "
                             f"fix --classes / the spec's classes")

    def source_lut(self, n: int) -> np.ndarray:
        """Original label -> model label for source samples (-1: not a source class, dropped)."""
        lut = np.full(n, -1, dtype=np.int64)
        lut[list(self.source_classes)] = np.arange(self.num_known)
        return lut

    def target_lut(self, n: int) -> np.ndarray:
        """Original label -> target label (shared: the model's number; target-private: K; -1: dropped)."""
        lut = np.full(n, -1, dtype=np.int64)
        lut[list(self.shared)] = np.arange(len(self.shared))
        lut[list(self.target_private)] = self.num_known
        return lut


# --------------------------------------------------------------------------- the source side

SOURCE_SEP = "+"  # between the source domains of a multi-source task's ``source``
SAMPLING = "balanced: batch_size samples from each source domain per step"


def source_domains(source: str) -> list[str]:
    """The source domains a task's ``source`` names, in order (one for a single-source task)."""
    return str(source).split(SOURCE_SEP)


def join_sources(names: Sequence[str]) -> str:
    """``RunConfig.source`` of a task with these source domains (in this order)."""
    return SOURCE_SEP.join(names)


def held_out_tasks(source: str) -> list[tuple[str, str]]:
    """The validation tasks of leave-one-domain-out cross-validation (DomainBed) for a task with these
    sources: each source domain d in turn as the target of the others, ``[(sources without d, d)]``;
    empty when fewer than 3 sources (a validation task keeps at least 2)."""
    names = source_domains(source)
    if len(names) < 3:
        return []
    return [(join_sources([n for n in names if n != d]), d) for d in names]


def check_sources(source: str, target: str) -> list[str]:
    """The task's source domains, or a one-line DalabError: an empty name, a domain named twice,
    the target among several sources (a single source equal to the target is the trainer's error)."""
    names = source_domains(source)
    if any(not n.strip() for n in names):
        raise DalabError(f"bad source {source!r}: an empty domain name; give the source domains as a,b,c "
                         f"(--sources) or joined by {SOURCE_SEP!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DalabError(f"source domain {dup[0]!r} is named twice in {source!r}; name each source domain once")
    if len(names) > 1 and target in names:
        raise DalabError(f"the target {target!r} is also one of the sources ({', '.join(names)}): a task adapts to a "
                         f"domain it has no labels of; drop it from --sources or pick another --target")
    return names


def num_sources(config: Mapping[str, Any]) -> int:
    """How many source domains a run config or record config has."""
    return len(source_domains(config["source"]))


def _ints(values: Any, role: str) -> list[int]:
    if isinstance(values, str):
        return parse_classes(values, role)
    if not isinstance(values, (list, tuple, range)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in values):
        raise DalabError(f"classes.{role} must be a list of class indices or a range text like '0-4', got {values!r}")
    return list(values)


def parse_classes(text: str, role: str = "classes") -> list[int]:
    """``"0-4"``, ``"0,2,5-7"`` or ``""`` -> class indices."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise DalabError(f"bad class list {text!r} in {role}: use indices and ranges like 0-4 or 0,2,5-7") from None
        out.extend(range(a, b + 1))
    return out


def _ranges(values: Sequence[int]) -> str:
    parts, vals = [], list(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


def label_set(setting: str | None = None, classes: Any = None) -> LabelSet | None:
    """The label set a run asks for: a named ``setting`` (the digits split of
    :data:`dalab.datasets.pairs.LABEL_SETS`), explicit ``classes`` (``"SHARED:SOURCE_PRIVATE:
    TARGET_PRIVATE"`` text or a mapping with those keys), or both when they agree. None = closed-set
    over all classes (no label set)."""
    from dalab.datasets.base import closest
    from dalab.datasets.pairs import LABEL_SETS

    if setting is not None and setting not in SETTINGS:
        raise DalabError(f"unknown setting {setting!r}{closest(setting, SETTINGS)}; choose one of {', '.join(SETTINGS)}")
    if classes is None:
        return None if setting in (None, "closed") else LabelSet(**LABEL_SETS[setting])
    if isinstance(classes, str):
        parts = classes.split(":")
        if len(parts) > 3:
            raise DalabError(f"bad --classes {classes!r}: use SHARED[:SOURCE_PRIVATE[:TARGET_PRIVATE]], e.g. 0-4::5-9")
        ls = LabelSet(*(parse_classes(p, role) for p, role in zip(parts, ROLES)))
    elif isinstance(classes, Mapping):
        ls = LabelSet.from_key(classes)
    else:
        raise DalabError(f"classes must be text like '0-4::5-9' or a mapping with {', '.join(ROLES)}, got {classes!r}")
    if setting is not None and ls.setting != setting:
        raise DalabError(f"the classes {ls.text()!r} define a {ls.setting} task, not a {setting} one; drop one of "
                         f"setting/--setting and classes/--classes, or make them agree")
    return ls


def classes_key(setting: str | None, classes: Any = None) -> dict[str, list[int]] | None:
    """A run config's ``classes`` from ``--setting`` / ``--classes`` or a spec's ``setting:`` /
    ``classes:`` (:func:`label_set`); None for closed-set over all classes."""
    ls = label_set(setting, classes)
    return ls.key() if ls else None


def of_config(config: Mapping[str, Any]) -> LabelSet | None:
    """The label set of a run config or record config (None: closed-set over all classes)."""
    c = config.get("classes")
    return LabelSet.from_key(c) if c else None


def setting_of(record: Mapping[str, Any]) -> str:
    """A record's setting name (``closed`` for records without a label set)."""
    ls = of_config(record["config"])
    return ls.setting if ls else "closed"


def headline(record: Mapping[str, Any]) -> str:
    """The metric a record's tables report (a key of its evaluation points' split metrics)."""
    return HEADLINE[setting_of(record)][0]


def test_time(record: Mapping[str, Any]) -> bool:
    """Whether a record is a test-time adaptation run (a method with ``test_time``, adapting on a
    stream: dalab.streams), read from the registry (a record of unknown code: from its points)."""
    from dalab.methods import METHODS

    cls = METHODS.get((record.get("method") or {}).get("name"))
    if cls is not None:
        return bool(cls.test_time)
    return any("online" in ev for ev in record.get("evals") or [])


def headline_split(record: Mapping[str, Any]) -> str:
    """The split a record's tables report: ``tgt_test`` (the model after training, on target test),
    or ``online`` for a test-time run (its predictions on the stream, each made before the model
    adapted on that batch)."""
    return "online" if test_time(record) else "tgt_test"


SPLIT_NAMES = {"tgt_test": "Target test", "online": "Online (each stream batch predicted before adapting on it)"}


def score(record: Mapping[str, Any], ev: Mapping[str, Any], split: str | None = None) -> float:
    """The record's headline metric (:func:`headline`) at evaluation point ``ev`` on ``split``
    (default: the record's :func:`headline_split`), as a fraction: what every table cell, figure and
    convergence mark reads."""
    return ev[split or headline_split(record)][headline(record)]


def tag(config: Mapping[str, Any]) -> str:
    """What a task adds to its pair's name: "" for closed-set over all classes, else the setting
    and its split (``openset 0-4::5-9``)."""
    ls = of_config(config)
    return f"{ls.setting} {ls.text()}" if ls else ""


def id_tag(key: Mapping[str, Any]) -> str:
    """The readable part of a run id a label set adds (``__openset``); the hash covers the classes."""
    ls = of_config(key)
    return f"__{ls.setting}" if ls else ""
