"""Names in tables and figures, read from where each thing is declared (written once there):
methods (``display`` next to ``family`` in methods/<name>.py), domains (``register_domain(...,
display=...)``), selection rules (dalab.selection). Registry names stay the CLI's and the files'.
Unknown names (e.g. a method from a record whose code is gone) are shown as they are.
"""

from __future__ import annotations


def method(name: str) -> str:
    from dalab.methods import METHODS

    return METHODS[name].display if name in METHODS else name


def failure(name: str, settings=("closed",)) -> str:
    """A method's documented failure under dalab's protocol (``known_failure``), "" if none: the
    footnote a results table of the label-set ``settings`` prints under the method's rows (a note
    given per setting only where the table holds that setting)."""
    from dalab.methods import METHODS

    # the method's own declaration only: a subclass (IM extends entropy minimisation) does not inherit it
    note = vars(METHODS[name]).get("known_failure", "") if name in METHODS else ""
    if isinstance(note, dict):
        return " ".join(f"({s}) {note[s]}" if len(settings) > 1 else note[s] for s in settings if s in note)
    return note


def domain(name: str) -> str:
    from dalab.datasets import DOMAINS

    return DOMAINS[name].display if name in DOMAINS else name


def pair(source: str, target: str) -> str:
    """``"MNIST-5k → UCI digits"``; several sources: ``"MNIST-5k + SynDigits → MNIST-M-5k"``."""
    from dalab.tasks import source_domains

    return f"{' + '.join(domain(s) for s in source_domains(source))} → {domain(target)}"


def pair_key(key: str) -> str:
    """Display name of a table's pair key ``"source→target"`` (registry names)."""
    s, _, t = key.partition("→")
    return pair(s, t) if t else key


def family(name: str) -> str:
    """``"fine-tuning"`` -> ``"Fine-tuning"``."""
    return name[:1].upper() + name[1:]


def rule(name: str) -> str:
    from dalab.selection import RULES

    return RULES[name].label if name in RULES else name


def budget(b: str) -> str:
    """A row group's label: what target labels its methods see."""
    if b in ("0", "all"):
        return "no target labels" if b == "0" else "all target labels"
    return f"{b} target label{'' if b == '1' else 's'} per class"


# --------------------------------------------------------------------------- what a record's row is

def pair_name(rec: dict) -> str:
    """A record's task as tables key it: ``source→target``, several sources joined by ``+``
    (``mnist5k+syndigits+ucidigits→mnistm5k``: dalab.tasks)."""
    return f"{rec['config']['source']}→{rec['config']['target']}"


def setting(rec: dict) -> str:
    """A row's data setting, named in the tables: backbone, pretrained weights, step budget, the
    task's label set (:func:`dalab.tasks.tag`), data split, precision and data options (the method's own hyperparameters and source model are the
    row's other key: dalab.tables.method_setting)."""
    from dalab.tasks import tag, test_time

    c = rec["config"]
    steps = c.get("steps", "?")
    # a test-time run's steps are its source model's budget (its own length is its stream's)
    s = f"{c.get('backbone', '?')}, {'source model ' if test_time(rec) else ''}{steps} step{'' if steps == 1 else 's'}"
    if task := tag(c):  # a label-set task: never pooled with another split of the same pair
        s += f", {task}"
    if c.get("pretrained"):
        s += f", pretrained {c['pretrained']}"
    if c.get("split_seed", 0):
        s += f", split {c['split_seed']}"
    prec = rec.get("train", {}).get("precision")
    if prec and prec != "fp32":
        s += f", {prec}"
    if test_time(rec):  # a test-time run: its stream is part of the data it sees (dalab.streams)
        from dalab.streams import StreamOptions
        s += f", stream {StreamOptions.of({**_stream_defaults(), **rec.get('hparams', {})}, c['target']).text()}"
    from dalab.methods.base import DATA_HPARAMS
    hp = rec.get("hparams", {})
    opts = [f"{k}={hp[k]}" for k in DATA_HPARAMS if k in hp and hp[k] != DATA_HPARAMS[k].default]
    return s + (", " + ", ".join(opts) if opts else "")


def _stream_defaults() -> dict:
    from dalab.streams import stream_hparams

    return {k: h.default for k, h in stream_hparams().items()}
