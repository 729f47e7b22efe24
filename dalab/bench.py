"""Benchmark grids: methods x pairs x label budgets x seeds (x hparam trials), resumable.

A spec (YAML, see ``benchmarks/digits.yaml``) expands deterministically into :class:`RunConfig`s.
Every run has a deterministic id; a finished run has a ``done`` marker and is skipped on
re-launch, so an interrupted grid resumes where it stopped. A worker *claims* a run (an
exclusively created ``<id>.claim`` file) before training it, so several workers -- or several
``dalab bench`` processes on the same results dir -- never train the same run twice. A claim left
by a dead process on this host is stale and is taken over.

Launchers: ``local`` (this process, sequential), ``local --jobs N`` (N worker processes: with
GPUs visible they are spread round-robin over the GPUs, so ``--jobs 8`` on one GPU trains 8 runs of
a small model concurrently on it; without GPUs they split the CPU cores), ``submitit-local`` and
``slurm`` (through submitit's executors; we do not write our own scheduler).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dalab import runs
from dalab.runs import RunConfig, RunOptions, release_claim, run_state, try_claim  # noqa: F401 -- re-exported
from dalab.progress import clear_line
from dalab.selection import DEFAULT_RULES
from dalab.selection import RULE_NAMES as RULES  # the one registry of selection rules
from dalab.tasks import headline_split, score
from dalab.utils import DalabError


def _key(default: Any = dataclasses.MISSING, *, type: str, help: str, factory: Any = None,
         shown: str | None = None) -> Any:
    """A spec key: its default, the type and meaning that docs/spec.md and the error messages read
    (``help``: one line; ``shown``: how the default is written when it is computed)."""
    meta = {"type": type, "help": help, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# eval_every default: this many evaluation points per run (the main job's: 500 steps, every 125), so
# the selection rules have checkpoints to choose from and one point sits halfway (the plateau measure)
DEFAULT_EVAL_POINTS = 4


@dataclass
class BenchSpec:
    """A benchmark grid. Every field can be given in the YAML spec; docs/spec.md lists them, with
    their types, defaults and meaning, generated from this definition
    (``python -m dalab.benchmarks.spec_reference --write``)."""

    name: str = _key("bench", type="string",
                     help="the grid's name: printed by `dalab bench`, and part of a declared search's identity")
    methods: list[str] | str = _key(
        "all", type="list of method names, or `all`",
        help="methods to run (`dalab list`); `all` = every registered method that runs on the spec's setting, "
             "source_only first, test-time methods left out (a spec lists them by name: benchmarks/digits_tta.yaml)")
    pairs: list[list[Any]] | str = _key(
        "default", type="`default`, a benchmark name, or a list of [source, target]",
        help="domain pairs: `default` = the offline digits pairs; a benchmark name from `dalab list` "
             "(e.g. digits-extra, office31); a source may be a list of domains (a multi-source task: "
             "[[mnist5k, syndigits], ucidigits])")
    leave_one_out: list[str] | None = _key(
        None, type="list of >= 3 domain names, or null",
        help="instead of pairs: each of these domains as the target, all the others as its sources, in the "
             "listed order (multi-source adaptation and domain generalization; dalab.tasks)")
    leave_one_out_cv: bool = _key(
        False, type="boolean",
        help="with leave_one_out (>= 4 domains): also train every task's validation runs -- the same method, "
             "setting and seed with each of its sources held out in turn as the target of the others -- for the "
             "`lodo` selection rule (DomainBed's leave-one-domain-out cross-validation); k more runs per task, "
             "left out of the tables' columns")
    setting: str = _key("closed", type="`closed`, `partial`, `openset` or `universal`",
                        help="label-set setting of every task (dalab.tasks): the digits split `dalab list` shows, "
                             "unless `classes` gives one; tables report the setting's headline metric")
    classes: str | dict[str, list[int]] | None = _key(
        None, type="text SHARED:SOURCE_PRIVATE:TARGET_PRIVATE (e.g. `0-4::5-9`), a mapping shared / "
                   "source_private / target_private -> class indices, or null",
        help="an explicit label-set split of class indices (null: the setting's split)")
    seeds: list[int] = _key(type="list of integers >= 0", factory=lambda: [0, 1, 2],
                            help="training seeds; every setting runs once per seed (the tables' mean ± std)")
    budgets: list[str] = _key(type="list of 0, k (labels per class) or `all`", factory=lambda: ["0"],
                              help="target-label budgets; each method runs the ones it supports (0 = unsupervised)")
    steps: int = _key(2000, type="integer >= 1", help="training steps of every run")
    eval_every: int | None = _key(
        None, type="integer >= 1, or null", shown=f"steps / {DEFAULT_EVAL_POINTS} (rounded down)",
        help=f"evaluate (and checkpoint) every N steps; the default gives {DEFAULT_EVAL_POINTS} evaluation "
             "points, one of them halfway")
    backbone: str = _key("lenet_bn", type="`lenet`, `lenet_bn`, `resnet18`, `resnet50`, ...",
                         help="network (dalab.methods.nets.BACKBONES); lenet_bn is the main job's (the "
                              "BatchNorm-free lenet can stay at chance at short budgets)")
    pretrained: str | None = _key(None, type="path or null",
                                  help="local ImageNet weight file for ResNet backbones (never downloaded)")
    split_seed: int = _key(0, type="integer >= 0", help="seed of the train/val/test splits (fixed across run seeds)")
    precision: str = _key("auto", type="`auto`, `fp32` or `bf16`",
                          help="bf16 autocast of forward passes; auto = bf16 where the device has it natively")
    hparams: dict[str, dict[str, Any]] = _key(
        type="mapping: method name or `all` -> {hparam: value}", factory=dict,
        help="hyperparameter overrides (`dalab list METHOD` lists a method's); `all` applies to every "
             "method that has the key, a method's own entry wins")
    variants: list[dict[str, Any]] | dict[str, list[dict[str, Any]]] = _key(
        type="list of {hparam: value}, or mapping: method or `all` -> such a list", factory=lambda: [{}],
        help="settings run as separate table rows, on top of hparams; a list applies to every method that "
             "has the keys ([{}] = the spec's settings only); a mapping adds rows per method beside its main "
             "setting, each with an optional `name:` for its row")
    trials: int = _key(1, type="integer >= 1",
                       help="random search: trial 0 is the defaults, trials 1..n-1 seeded draws from each "
                            "hyperparameter's search space; the selection rule picks per pair, one table row")
    search_seed: int = _key(0, type="integer", help="seed of the random search's draws")
    validators: list[str] | str = _key(
        "all", type="`all` or a list of validator names",
        help="label-free validators computed at every evaluation point (dalab.evaluation.UNSUPERVISED_SCORES); "
             "list fewer to save evaluation time (mixval costs one more pass over target train): a rule of "
             "`selection` must not need a validator left out")
    spread: str = _key("std", type="`std` or `se`",
                       help="what follows each mean in the tables: the seeds' standard deviation, or the standard "
                            "error of the mean (DomainBed's layout)")
    baseline: str = _key("source_only", type="method name",
                         help="the row every other row is compared with (Δ, significance marks), per data setting "
                              "(a test-time spec: no_adapt, the source model on the same stream)")
    selection: list[str] = _key(type="list of rule names", factory=lambda: list(DEFAULT_RULES),
                                help="selection rules, one table each: " + ", ".join(RULES) + " (default: all but "
                                     + ", ".join(r for r in RULES if r not in DEFAULT_RULES) + ")")
    runs_dir: str = _key("results/runs", type="folder",
                         help="where run folders go (shared between grids: a finished run is never re-run)")
    out: str = _key("results/bench", type="folder", help="where the tables and figures go")

    def __post_init__(self) -> None:
        if self.eval_every is None and isinstance(self.steps, int) and not isinstance(self.steps, bool) \
                and self.steps >= 1:
            self.eval_every = max(1, self.steps // DEFAULT_EVAL_POINTS)

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line meaning of a spec key."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "BenchSpec":
        """A spec file; ``extends: other.yaml`` (relative to this file) starts from that spec's keys."""
        p = Path(path)
        return cls.from_dict(cls._read(p), str(p))

    @classmethod
    def _read(cls, p: Path, depth: int = 0) -> dict:
        """The keys a spec file gives, over those of the spec it extends: keys either file leaves
        out keep their default -- a computed one (eval_every) is computed from the merged keys."""
        import yaml

        if not p.is_file():
            raise DalabError(f"benchmark spec {p} not found; pass a YAML file such as benchmarks/digits.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DalabError(f"benchmark spec {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise DalabError(f"malformed YAML in {p}{where}: {getattr(e, 'problem', e)}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise DalabError(f"benchmark spec {p} must be a mapping of fields ({', '.join(f.name for f in fields(cls))})")
        if "extends" in raw:  # another spec's fields, overridden by this one's (one home for shared choices)
            base = raw.pop("extends")
            if not isinstance(base, str) or not base:
                raise DalabError(f"{p}: field 'extends' must name another spec file, relative to {p.parent}")
            if depth >= 4:
                raise DalabError(f"{p}: 'extends' nests more than 4 specs deep; a spec may extend a spec that "
                                 f"extends no further")
            parent = cls._read(p.parent / base, depth + 1)
            cls.from_dict(dict(parent), str(p.parent / base))  # the parent is a valid spec on its own
            hp = {**parent.get("hparams", {}), **raw.get("hparams", {})}  # per method: a method's entry wins
            raw = {**parent, **raw, **({"hparams": hp} if hp else {})}
        return raw

    @classmethod
    def from_dict(cls, raw: dict, where: str = "spec") -> "BenchSpec":
        from dalab.datasets.base import closest

        known = {f.name for f in fields(cls)}
        for k in raw:
            if k not in known:
                raise DalabError(f"unknown field {k!r} in {where}{closest(str(k), known)}; "
                                 f"allowed: {', '.join(sorted(known))}, extends (see docs/spec.md)")
        spec = cls(**raw)
        spec.validate(where)
        return spec

    def validate(self, where: str = "spec") -> None:
        def bad(name, msg):
            raise DalabError(f"{where}: field {name!r} {msg} ({name}: {self.help(name)}; see docs/spec.md)")

        if not isinstance(self.name, str) or not self.name.strip():
            bad("name", f"must be a non-empty string, got {self.name!r}")
        from dalab.tables import SPREADS
        if self.spread not in SPREADS:
            bad("spread", f"must be one of {', '.join(SPREADS)}, got {self.spread!r}")
        from dalab.evaluation import UNSUPERVISED_SCORES
        if self.validators != "all":
            if not isinstance(self.validators, list) or not all(v in UNSUPERVISED_SCORES for v in self.validators):
                bad("validators", f"must be `all` or a list of {', '.join(UNSUPERVISED_SCORES)}, got {self.validators!r}")
            off = [r for r in (self.selection if isinstance(self.selection, list) else [])
                   if r in UNSUPERVISED_SCORES and r not in self.validators]
            if off:
                bad("validators", f"leaves out {', '.join(off)}, which `selection` picks by; add them or drop the rules")
        from dalab.methods import METHODS
        if self.baseline not in METHODS:
            bad("baseline", f"must name a registered method, got {self.baseline!r}")
        for name in ("steps", "eval_every", "trials"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"must be an integer >= 1, got {v!r}")
        if not isinstance(self.seeds, list) or not self.seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            bad("seeds", f"must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if not isinstance(self.budgets, list) or not self.budgets:
            bad("budgets", f"must be a non-empty list of 0, k (labels per class) or 'all', got {self.budgets!r}")
        self.budgets = [str(b) for b in self.budgets]
        for r in self.selection:
            if r not in RULES:
                from dalab.datasets.base import closest
                bad("selection", f"has unknown rule {r!r}{closest(str(r), RULES)}; allowed: {', '.join(RULES)}")
        lists = self.variants.values() if isinstance(self.variants, dict) else [self.variants]
        if not isinstance(self.variants, (list, dict)) or not self.variants or not all(
                isinstance(vs, list) and vs and all(isinstance(v, dict) for v in vs) for vs in lists):
            bad("variants", "must be a non-empty list of {hparam: value} mappings ([{}] = defaults), or map a "
                            f"method (or 'all') to such a list, got {self.variants!r}")
        for v in (v for vs in lists for v in vs):
            if "name" in v and (not isinstance(v["name"], str) or not v["name"].strip()):
                bad("variants", f"has a name that is not a non-empty string: {v['name']!r}")
        if not isinstance(self.hparams, dict) or not all(isinstance(v, dict) for v in self.hparams.values()):
            bad("hparams", "must map a method name (or 'all') to {hparam: value}")
        if isinstance(self.pairs, list) and not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], str) and (
                    isinstance(p[0], str) or isinstance(p[0], list) and p[0] and all(isinstance(x, str) for x in p[0]))
                for p in self.pairs):
            bad("pairs", f"must be 'default', a benchmark name or a list of [source, target] (a source: a domain or "
                         f"a list of domains), got {self.pairs!r}")
        if self.leave_one_out is not None:
            loo = self.leave_one_out
            if not isinstance(loo, list) or len(loo) < 3 or not all(isinstance(d, str) and d for d in loo):
                bad("leave_one_out", f"must be a list of at least 3 domain names (each target keeps 2 or more "
                                     f"sources), got {loo!r}")
            if len(set(loo)) != len(loo):
                bad("leave_one_out", f"names a domain twice: {loo!r}")
            if self.pairs != "default":
                bad("leave_one_out", "replaces 'pairs': give one of the two")
        if self.leave_one_out_cv not in (True, False):
            bad("leave_one_out_cv", f"must be true or false, got {self.leave_one_out_cv!r}")
        if self.leave_one_out_cv and (self.leave_one_out is None or len(self.leave_one_out) < 4):
            bad("leave_one_out_cv", "needs leave_one_out with at least 4 domains (each validation run keeps 2 or "
                                    "more sources)")
        for name in ("methods", "pairs", "selection"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                bad(name, "is an empty list: the grid would have no runs (and its tables would be empty); "
                          "name at least one, or leave the field out for its default")
        for name in ("runs_dir", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, f"must be a folder path, got {getattr(self, name)!r}")


def resolve_pairs(pairs: list | str, leave_one_out: list[str] | None = None) -> list[tuple[str, str]]:
    """A spec's tasks as (source, target): a list of [source, target] (a source: one domain, or a
    list joined into a multi-source task's ``source``, dalab.tasks), "default" (the offline digits
    benchmark) or the name of a benchmark in ``dalab.datasets.BENCHMARKS`` (e.g. office31); with
    ``leave_one_out``, each of its domains as target with the others as sources."""
    from dalab.datasets import BENCHMARKS, DEFAULT_PAIRS
    from dalab.datasets.base import closest
    from dalab.tasks import join_sources

    if leave_one_out is not None:
        return [(join_sources([d for d in leave_one_out if d != t]), t) for t in leave_one_out]
    if pairs == "default":
        return [tuple(p) for p in DEFAULT_PAIRS]
    if isinstance(pairs, str):
        if pairs not in BENCHMARKS:
            raise DalabError(f"field 'pairs': unknown benchmark {pairs!r}{closest(pairs, BENCHMARKS)}; use "
                             f"'default', one of {', '.join(BENCHMARKS)}, or a list of [source, target]")
        return [tuple(p) for p in BENCHMARKS[pairs]]
    return [(join_sources(s) if isinstance(s, list) else s, t) for s, t in pairs]


def table_pairs(spec: BenchSpec) -> list[tuple[str, str]]:
    """The tasks a spec's tables show as columns (its grid may also hold validation runs: leave_one_out_cv)."""
    return resolve_pairs(spec.pairs, spec.leave_one_out)


def resolve_methods(spec: BenchSpec) -> list[str]:
    from dalab.methods import METHODS, get_method

    if spec.methods == "all":
        # every method that runs on the spec's setting (a method made for another one is left out)
        # and on its tasks' number of sources (a multi-source method needs several on every task);
        # test-time methods adapt on streams, a protocol of their own: a spec lists them by name
        from dalab.tasks import source_domains

        k = min(len(source_domains(s)) for s, _ in resolve_pairs(spec.pairs, spec.leave_one_out))
        return sorted((n for n, c in METHODS.items() if spec.setting in c.settings and not c.test_time
                       and c.min_sources <= k),
                      key=lambda n: (n != "source_only", METHODS[n].family, n))
    if not isinstance(spec.methods, list):
        raise DalabError(f"field 'methods' must be 'all' or a list of method names, got {spec.methods!r}")
    for m in spec.methods:
        get_method(m)
    return list(spec.methods)


def trial_hparams(method: str, trial: int, spec: BenchSpec) -> dict[str, Any]:
    """Trial 0: the defaults (plus spec overrides). Trial t > 0: a seeded random draw from every
    hyperparameter's search space (the method's own and the shared ones), then spec overrides.
    Each hyperparameter draws from its own generator, seeded by (search seed, method, trial, its
    name), so adding or removing a hyperparameter never changes the others' draws."""
    import numpy as np

    from dalab.methods import SHARED_HPARAMS, get_method

    cls = get_method(method)
    out: dict[str, Any] = {}
    if trial > 0:
        table = {**SHARED_HPARAMS, **cls.hparams}
        out = {k: h.sample(np.random.default_rng([spec.search_seed, zlib.crc32(method.encode()), trial,
                                                  zlib.crc32(k.encode())]))
               for k, h in sorted(table.items()) if h.space is not None and k != "batch_size"}
    out.update(spec.hparams.get("all", {}))
    out.update(spec.hparams.get(method, {}))
    return out


def variants_for(spec: BenchSpec, method: str) -> list[dict[str, Any]]:
    """The settings ``method`` runs as rows: the spec's list, or (mapping form) its main setting
    plus the variants listed for it and for ``all``. A variant's ``name`` stays in it (the row's
    name, see :func:`expand`); :func:`variant_hparams` drops it."""
    if isinstance(spec.variants, list):
        return spec.variants
    return [{}] + spec.variants.get("all", []) + spec.variants.get(method, [])


def variant_hparams(variant: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in variant.items() if k != "name"}


def _check_variants(spec: BenchSpec, methods: list[str]) -> None:
    """Every variant's hyperparameter must exist for some method of the grid (the mapping form:
    for the method it is listed under) and its value must be valid, or the spec is rejected before
    anything runs (a typo is never skipped silently)."""
    from dalab.datasets.base import closest
    from dalab.methods import SHARED_HPARAMS, get_method

    listed = spec.variants.items() if isinstance(spec.variants, dict) else [("all", spec.variants)]
    for owner_name, variants in listed:
        if owner_name != "all":
            get_method(owner_name)
            if owner_name not in methods:
                raise DalabError(f"field 'variants': method {owner_name!r} is not in the grid's methods "
                                 f"({', '.join(methods)}); add it to 'methods' or remove its variants")
        tables = [{**SHARED_HPARAMS, **get_method(m).hparams} for m in (methods if owner_name == "all" else [owner_name])]
        for k, v in (kv for variant in variants for kv in variant_hparams(variant).items()):
            owner = next((t[k] for t in tables if k in t), None)
            if owner is None:
                raise DalabError(f"field 'variants': unknown hyperparameter {k!r}{closest(str(k), set().union(*tables))} "
                                 f"(no method of the grid has it)")
            try:
                owner.parse(k, v)
            except DalabError as e:
                raise DalabError(f"field 'variants': {e}") from None


def source_hparams(spec: BenchSpec) -> dict[str, Any]:
    """What the spec says about the source model: its hparams for ``all`` and ``source_only``."""
    return {**spec.hparams.get("all", {}), **spec.hparams.get("source_only", {})}


def expand(spec: BenchSpec, skipped: list[str] | None = None, groups: dict | None = None):
    """The grid as a list of (RunConfig, trial), validated, in a stable order (source_only first
    so source-pretrained models exist before the methods that start from them). A variant a method
    cannot take (``mixup: cross`` for ``source_only``, which sees no target data; a hyperparameter
    the method does not have) is left out for that method and the reason appended to ``skipped``;
    any other invalid value is an error, before anything runs. ``groups`` receives, per run id,
    what the spec says about its table row (:class:`dalab.tables.RowGroup`): the declared search
    (``trials`` > 1) whose trials one row pools, and the variant's ``name``."""
    from dalab.tables import RowGroup
    from dalab.datasets.base import parse_budget
    from dalab.methods import SHARED_HPARAMS, get_method, resolve_hparams
    from dalab.methods.base import budget_kind
    from dalab.tasks import classes_key
    from dalab.trainer import validate
    from dalab.utils import Unsupported

    for key, overrides in spec.hparams.items():
        if key != "all":  # checked even for a method outside the grid (a shared spec lists every method)
            resolve_hparams(get_method(key), overrides)
    pairs = table_pairs(spec)
    if spec.leave_one_out_cv:  # the validation runs of the `lodo` rule, after the tasks the tables show
        from dalab.tasks import held_out_tasks
        pairs = pairs + [t for s, _ in pairs for t in held_out_tasks(s)]
    classes = classes_key(spec.setting, spec.classes)
    methods = resolve_methods(spec)
    _check_variants(spec, methods)
    src_hp = source_hparams(spec)
    out = []

    def skip(variant, method, why):
        msg = f"variant {variant} skipped for {method}: {why}"
        if skipped is not None and msg not in skipped:
            skipped.append(msg)

    for method in methods:
        cls = get_method(method)
        table = {**SHARED_HPARAMS, **cls.hparams}
        budgets = [b for b in spec.budgets if budget_kind(parse_budget(b)) in cls.label_budgets]
        for src, tgt in pairs:
            for b in budgets:
                for variant in variants_for(spec, method):
                    over = variant_hparams(variant)
                    if any(k not in table for k in over):
                        skip(variant, method, f"it has no hyperparameter {', '.join(k for k in over if k not in table)}")
                        continue
                    group = RowGroup(search=(f"{spec.name} {json.dumps(over, sort_keys=True)}" if spec.trials > 1
                                             else None), name=variant.get("name"))
                    for t in range(spec.trials):
                        hp = {**trial_hparams(method, t, spec), **over}
                        for seed in spec.seeds:
                            cfg = RunConfig(method, src, tgt, seed=seed, budget=b, steps=spec.steps,
                                            eval_every=spec.eval_every, backbone=spec.backbone,
                                            pretrained=spec.pretrained, split_seed=spec.split_seed,
                                            precision=spec.precision, hparams=hp, source_hparams=src_hp,
                                            classes=classes)
                            try:
                                validate(cfg)
                            except Unsupported as e:
                                if not variant:
                                    raise
                                skip(variant, method, e)
                                continue
                            out.append((cfg, t))
                            if groups is not None and group != RowGroup():
                                groups[cfg.run_id()] = group
    return out


def grid_records(spec: BenchSpec, grid) -> list[dict]:
    """The finished records of ``grid``'s runs under the spec's runs_dir (other runs there are left out)."""
    from dalab.tables import load_records

    ids = {cfg.run_id() for cfg, _ in grid}
    return [r for r in load_records(spec.runs_dir) if r["run_id"] in ids]


def write_grid_tables(spec: BenchSpec, grid, groups: dict, command: str, records: list[dict] | None = None,
                      plots: bool = True) -> list[Path]:
    """The spec's tables from its grid's records: what ``dalab bench`` writes after a grid, and what
    ``make tables`` (dalab.rederive) writes from committed records alone. ``records`` come from
    :func:`grid_records`, which loads them with the lodo rule's scores attached (dalab.tables.load_records);
    the grid's validation runs are left out of the tables."""
    from dalab.tables import write_tables

    shown = set(table_pairs(spec))
    pairs = list(dict.fromkeys(f"{c.source}→{c.target}" for c, _ in grid if (c.source, c.target) in shown))
    records = grid_records(spec, grid) if records is None else records
    records = [r for r in records if (r["config"]["source"], r["config"]["target"]) in shown]
    return write_tables(records, spec.out, spec.selection, command, pairs, plots=plots, groups=groups,
                        baseline=spec.baseline, spread=spec.spread)


# --------------------------------------------------------------------------- run states

def run_or_load(cfg, runs_dir: str | os.PathLike, device: str = "auto", cached_only: bool = False,
                opts: RunOptions | None = None, **options) -> dict | None:
    """The record of run ``cfg``: read when it is done under ``runs_dir``, else trained now (or
    ``None`` with ``cached_only``). For benchmark scripts that reuse finished runs; ``options``
    override fields of ``opts`` (:class:`dalab.runs.RunOptions`)."""
    from dalab.trainer import train

    rd = Path(runs_dir)
    rec = runs.read_record(runs.run_dir(rd, cfg.run_id())) if runs.is_done(rd, cfg.run_id()) else None
    if rec is not None or cached_only:
        return rec
    return train(cfg, rd, opts, **{"device": device, "progress": False, **options})


def grid_report(runs_dir: str | os.PathLike, grid) -> tuple[int, list[str]]:
    """(number of grid runs not finished, one line per reason with its count and examples)."""
    from collections import defaultdict

    rd = Path(runs_dir)
    why: dict[str, list[str]] = defaultdict(list)
    for cfg, _ in grid:
        rid = cfg.run_id()
        st = run_state(rd, rid)
        if st == "done":
            continue
        if st == "failed":
            err = (runs.read_failure(rd, rid) or {}).get("error", "?")
            why[f"failed ({err})"].append(rid)
        elif st == "claimed":
            o = runs.claim_owner(rd, rid) or {}
            why[f"claimed by a live process (pid {o.get('pid', '?')} on {o.get('host', '?')})"].append(rid)
        elif (runs.run_dir(rd, rid) / "done").is_file():
            why["record unreadable (will be redone)"].append(rid)
        else:
            why[f"{st} (not trained yet; rerun to train it)"].append(rid)
    lines = [f"{len(ids)} {reason}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}" for reason, ids in why.items()]
    return sum(len(v) for v in why.values()), lines


# --------------------------------------------------------------------------- workers and launchers

def work(cfg_dicts: list[dict], runs_dir: str, opts: RunOptions | None = None, threads: int | None = None,
         worker: str = "", since: float | None = None, wait: bool = True) -> list[tuple[str, str]]:
    """Train every not-yet-done run of the list, each under a claim. Runs claimed by another live
    process are waited for (they are done, or their claim goes stale and is taken over, or they
    fail); a run that failed since ``since`` (this launch) is not retried by another worker.
    Returns [(run_id, state)], state = done / diverged / skipped / failed: <error>. A stop signal
    raises :class:`dalab.runs.Interrupted` once the current run has written its checkpoint."""
    import torch

    from dalab.trainer import train

    opts = opts or RunOptions()
    if threads:
        torch.set_num_threads(threads)
    rd = Path(runs_dir)
    since = time.time() if since is None else since
    pending = [RunConfig(**d) for d in cfg_dicts]
    results: dict[str, str] = {}
    told = False
    with runs.graceful_stop():
        while pending:
            progressed = False
            for cfg in list(pending):
                runs.check_stop()
                rid = cfg.run_id()
                failed = runs.read_failure(rd, rid)
                if runs.is_done(rd, rid) or (failed and failed.get("time", 0) >= since):
                    results.setdefault(rid, "skipped")
                    pending.remove(cfg)
                    continue
                if not runs.try_claim(rd, rid):
                    continue
                progressed = True
                pending.remove(cfg)
                try:
                    if runs.is_done(rd, rid):  # finished by another worker between check and claim
                        results.setdefault(rid, "skipped")
                        continue
                    t0 = time.perf_counter()
                    # a partial run (killed mid-way) continues from its last checkpoint
                    rec = train(cfg, rd, opts, progress=False, resume=True,
                                checkpoint_every=opts.checkpoint_every or cfg.eval_every)
                    runs.clear_failure(rd, rid)
                    acc = score(rec, rec["final"]) * 100 if rec["final"] else float("nan")
                    print(f"{clear_line()}{worker}{rec['status']:<8} {rid}  {headline_split(rec)} {acc:5.1f}  "
                          f"({time.perf_counter() - t0:.0f} s, {rec['train']['steps_per_s']:.0f} steps/s)", flush=True)
                    results[rid] = rec["status"]
                except (DalabError, KeyboardInterrupt):
                    raise
                except Exception as e:  # one broken run must not kill the grid
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    runs.write_failure(rd, rid, msg)
                    print(f"{clear_line(sys.stderr)}{worker}FAILED   {rid}: {msg}", file=sys.stderr, flush=True)
                    results[rid] = f"failed: {msg}"
                finally:
                    runs.release_claim(rd, rid)
            if pending and not progressed:
                if not wait:
                    break
                if not told:
                    print(f"{clear_line()}{worker}waiting for {len(pending)} run(s) claimed by other processes",
                          flush=True)
                    told = True
                time.sleep(0.5)
    return list(results.items())


def _worker_main(queue, args) -> None:
    """Entry point of a local worker process: dies with its parent (SIGTERM: it checkpoints its
    run and releases its claim), reports (kind, payload) on ``queue``."""
    runs.die_with_parent(signal.SIGTERM)
    try:
        queue.put(("ok", work(*args)))
    except runs.Interrupted as e:
        queue.put(("interrupted", e.signum))
    except KeyboardInterrupt:
        queue.put(("interrupted", int(signal.SIGINT)))
    except DalabError as e:
        queue.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which decides
        queue.put(("crash", f"{type(e).__name__}: {e}"))


def worker_placement(jobs: int, ngpu: int, cores: int, device: str = "auto") -> list[tuple[str, int]]:
    """(device, torch threads) of each local worker. With GPUs, worker i runs on cuda:(i mod ngpu),
    so jobs > ngpu puts several concurrent runs on each GPU; every worker keeps a slice of the CPU
    cores (its Python loop, evaluation metrics). Without GPUs the workers split the cores."""
    threads = max(1, cores // max(jobs, 1))
    if ngpu:
        return [(f"cuda:{i % ngpu}", threads) for i in range(jobs)]
    return [("cpu" if device == "auto" else device, threads) for _ in range(jobs)]


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (what Slurm's --cpus-per-task, taskset or
    a container grant), not the machine's count -- os.cpu_count() on a shared 128-core node would
    give every worker far too many threads."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def local_placement(jobs: int, device: str = "auto") -> list[tuple[str, int]]:
    """:func:`worker_placement` for this machine: the GPUs torch sees (``CUDA_VISIBLE_DEVICES``
    applies: ``cuda:i`` is the i-th visible GPU, and spawned workers inherit the variable) unless
    ``device`` names a CPU or one GPU, and the cores of :func:`available_cores`. Prints one line
    saying where each worker goes."""
    import torch

    ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    placement = worker_placement(jobs, ngpu, available_cores(), device)
    where = {}
    for dev, _ in placement:
        where.setdefault(dev, 0)
        where[dev] += 1
    names = {f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(ngpu)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"{clear_line()}{jobs} workers, {placement[0][1]} CPU threads each: " + ", ".join(
        f"{n} on {dev}" + (f" ({names[dev]})" if dev in names else "") for dev, n in where.items())
        + (f"; CUDA_VISIBLE_DEVICES={visible}" if ngpu and visible is not None else ""), flush=True)
    return placement


def _local_pool(todo: list[dict], runs_dir: str, opts: RunOptions, jobs: int, since: float) -> list[tuple[str, str]]:
    """``jobs`` worker processes over the same list (claims split it). A stop signal to this
    process is passed on to the workers as SIGTERM (they checkpoint and exit); if this process is
    killed outright, the kernel sends them SIGTERM (``runs.die_with_parent``)."""
    import dataclasses
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, name=f"dalab-worker-{i}",
                         args=(q, (todo, runs_dir, dataclasses.replace(opts, device=dev), threads,
                                   f"[w{i}] ", since)))
             for i, (dev, threads) in enumerate(local_placement(jobs, opts.device))]

    def forward(signum: int) -> None:
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    outcomes = []
    with runs.graceful_stop(forward=forward):
        for p in procs:
            p.start()
        while len(outcomes) < len(procs):
            try:
                outcomes.append(q.get(timeout=0.5))
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    try:  # a last message may still be in the pipe
                        outcomes.append(q.get(timeout=1.0))
                        continue
                    except queue_mod.Empty:
                        break  # a worker died without a word (killed): the grid report names its runs
        for p in procs:
            p.join()
        signum = runs.stop_requested()
    if signum is not None:
        raise runs.Interrupted(signum)
    for kind, payload in outcomes:
        if kind == "interrupted":
            raise runs.Interrupted(payload)
    for kind, payload in outcomes:
        if kind == "error":
            raise DalabError(payload)
        if kind == "crash":
            raise RuntimeError(f"a worker crashed: {payload}")
    return _merge([payload for kind, payload in outcomes if kind == "ok"])


try:  # submitit's requeue support: a Checkpointable's checkpoint() says what to resubmit
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover -- submitit is a dependency; keep dalab.bench importable
    _Checkpointable = object


class SubmititWorker(_Checkpointable):
    """What a submitit/Slurm job runs: :func:`work` over its share of the grid. On SIGUSR1/USR2
    (Slurm's warning before the time limit, ``--signal``) or SIGTERM (preemption), the current run
    finishes its step and writes its checkpoint, then submitit's own handler resubmits this same
    call (``checkpoint()``) and requeues the job, which resumes that run from its checkpoint."""

    def __call__(self, cfg_dicts, runs_dir, opts, worker="", since=None):
        try:
            return work(cfg_dicts, runs_dir, opts, None, worker, since)
        except runs.Interrupted as e:
            if e.signum != signal.SIGINT:
                self._requeue()
            raise

    @staticmethod
    def _requeue() -> None:
        import submitit

        env = submitit.JobEnvironment()
        handler = signal.getsignal(env._usr_sig())  # submitit's checkpoint_and_try_requeue, restored
        if callable(handler):
            handler(env._usr_sig(), None)  # calls self.checkpoint(...), requeues, exits the job


def submit(todo: list[dict], runs_dir: str, opts: RunOptions, launcher: str, jobs: int,
           folder: str, slurm: dict | None = None, since: float | None = None) -> list:
    """Submit ``todo`` in ``jobs`` chunks through submitit (``submitit-local`` or ``slurm``)."""
    import submitit

    ex = submitit.LocalExecutor(folder) if launcher == "submitit-local" else submitit.AutoExecutor(folder)
    ex.update_parameters(timeout_min=(slurm or {}).get("timeout_min", 24 * 60),
                         **{k: v for k, v in (slurm or {}).items() if k != "timeout_min"})
    n = max(1, jobs)
    chunks = [todo[i::n] for i in range(n)]
    return [ex.submit(SubmititWorker(), c, runs_dir, opts, f"[job{i}] ", since)
            for i, c in enumerate(chunks) if c]


def launch(spec: BenchSpec, grid, launcher: str = "local", jobs: int = 1, opts: RunOptions | None = None,
           submitit_dir: str | None = None, slurm: dict | None = None,
           progress: bool = False) -> list[tuple[str, str]]:
    """Run every not-done run of ``grid``; returns [(run_id, state)]. ``progress``: keep an
    overall line (runs done / total, failed, ETA) on stdout while the grid runs (:mod:`dalab.progress`)."""
    opts = opts or RunOptions()
    if spec.validators != "all":  # how the runs evaluate, never what they are (ids unchanged)
        opts = dataclasses.replace(opts, validators=tuple(spec.validators))
    if launcher not in ("local", "submitit-local", "slurm"):
        raise DalabError(f"unknown launcher {launcher!r}; use local, submitit-local or slurm")
    done = {cfg.run_id() for cfg, _ in grid if runs.is_done(spec.runs_dir, cfg.run_id())}
    todo_cfgs = [cfg for cfg, _ in grid if cfg.run_id() not in done]
    todo = [dataclasses.asdict(cfg) for cfg in todo_cfgs]
    if not todo:
        return []
    since = time.time()
    bar = None
    if progress:
        from dalab.progress import GridProgress

        bar = GridProgress(spec.runs_dir, todo_cfgs, len(grid), sorted(done), max(1, jobs), since)
        # the probe times steps on this machine: only where the runs train here (never a Slurm login node)
        bar.start(probe=launcher == "local", device=opts.device,
                  threads=max(1, available_cores() // jobs) if jobs > 1 else None)
    try:
        if launcher == "local" and jobs <= 1:
            return work(todo, spec.runs_dir, opts, None, "", since)
        if launcher == "local":
            return _local_pool(todo, spec.runs_dir, opts, jobs, since)
        folder = submitit_dir or str(Path(spec.runs_dir) / "_submitit")
        return _merge([j.result() for j in submit(todo, spec.runs_dir, opts, launcher, jobs, folder, slurm, since)])
    finally:
        if bar is not None:
            bar.stop()


def _merge(parts) -> list[tuple[str, str]]:
    """Several workers saw every run; keep each run's most informative state."""
    best: dict[str, str] = {}
    for part in parts:
        for rid, st in part:
            if rid not in best or best[rid] == "skipped":
                best[rid] = st
    return list(best.items())


# --------------------------------------------------------------------------- where a grid's time goes

def time_split(records: list[dict], wall_s: float, workers: int) -> dict[str, float]:
    """How ``workers`` processes spent ``wall_s`` seconds on the runs of ``records`` (those trained
    by this launch): training steps, evaluation, per-run set-up (data, model, records) and the rest
    (orchestration: process start-up, imports, waiting for the last worker). ``efficiency`` is the
    training-step time over the workers' total time: what a bare loop doing only the grid's steps
    would need, relative to the wall clock (the trainer's step costs within a few % of a bare
    loop's: results/speed.md)."""
    total = max(wall_s * max(workers, 1), 1e-9)
    train = sum(r["train"]["train_time_s"] for r in records)
    ev = sum(r["train"].get("eval_time_s", 0.0) for r in records)
    run = sum(r["train"]["wall_time_s"] for r in records)
    return {"runs": len(records), "wall_s": wall_s, "workers": workers, "train_s": train, "eval_s": ev,
            "setup_s": max(run - train - ev, 0.0), "orchestration_s": max(total - run, 0.0),
            "efficiency": train / total}


def write_timing(spec: "BenchSpec", records: list[dict], wall_s: float, workers: int, command: str) -> None:
    """Print where the grid's time went and write it to ``<out>/timing.json`` (the README's measured
    times read it), with the machine's 15-minute load average and core count when the grid ended, so a
    time measured while other work shared the cores says so."""
    from dalab.utils import atomic_write_json, machine_load

    split = time_split(records, wall_s, workers)
    print(format_time_split(split))
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(spec.out) / "timing.json", {**split, **machine_load(), "command": command})


def format_time_split(t: dict[str, float]) -> str:
    total = t["wall_s"] * t["workers"]
    parts = ", ".join(f"{k[:-2]} {t[k]:.0f} s ({100 * t[k] / max(total, 1e-9):.0f}%)"
                      for k in ("train_s", "eval_s", "setup_s", "orchestration_s"))
    return (f"time split over {t['workers']} worker(s) x {t['wall_s']:.0f} s for {t['runs']} runs: {parts}; "
            f"grid efficiency (training-step time / worker time) {t['efficiency']:.2f}")
