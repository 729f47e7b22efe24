"""Source pretraining, shared by every method that starts from a source-trained model.

The source model of a run is defined once, by :func:`source_config`: the ``source_only`` run of
the same task (pair and label set), seed, backbone, pretrained weights, step budget, evaluation schedule, split and
precision, with the run's *source hyperparameters* (``RunConfig.source_hparams``: in a benchmark,
the spec's hparams for ``all`` and ``source_only``; ``dalab run --source-set NAME=VALUE``) and the
run's input standardisation. In a benchmark grid the ``source_only`` row and the starting point of
``finetune``/``frozen_features``/``arch_mod`` are therefore the same run, trained once; every
record names it (``method.init_from``) and states its full configuration (``method.source_config``).

If that run is finished under the same runs dir, its ``model.pt`` is loaded; otherwise (or when
the weights are unreadable: moved aside, with a warning) it is trained, once, under the same claim
protocol as benchmark runs, through the one loop (the trainer passes its ``train`` in: this module
never imports the trainer, so there is no import circle). A finished run without its weights (a
committed record on a fresh clone: records are committed, weights never) is retrained with a
warning and its record replaced, so that the source-only row of a table is always the run the
two-phase methods started from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dalab import runs
from dalab.runs import RunConfig, RunOptions
from dalab.utils import DalabError


def source_config(cfg: RunConfig) -> RunConfig:
    """The ``source_only`` RunConfig a run with config ``cfg`` starts from. The method's own
    hyperparameters (and its augmentation/mixup/VAT options) do not define it; its source
    hyperparameters and input standardisation do."""
    hp = cfg.source_run_hparams()
    if hp is None:
        raise DalabError(f"method {cfg.method!r} with these hyperparameters does not start from a source model")
    return RunConfig("source_only", cfg.source, cfg.target, seed=cfg.seed, budget="0", steps=cfg.steps,
                     eval_every=cfg.eval_every, backbone=cfg.backbone, pretrained=cfg.pretrained,
                     split_seed=cfg.split_seed, precision=cfg.precision, hparams=hp, classes=cfg.classes)


def source_pretrained(cfg: RunConfig, runs_dir: str | Path, opts: RunOptions,
                      train_fn: Callable[..., dict]) -> tuple[dict, str]:
    """(state dict of the source-trained Classifier on CPU, run id it came from). Trains the
    ``source_only`` run first (with ``train_fn``, i.e. :func:`dalab.trainer.train`) when it is
    not finished, or when its weights cannot be read -- once; a second failure is an error."""
    scfg = source_config(cfg)
    rd = Path(runs_dir)
    rid = scfg.run_id()
    if runs.is_done(rd, rid) and not (runs.run_dir(rd, rid) / "model.pt").is_file():
        runs.warn(f"source run {rid} is finished but its weights are not under {rd} (committed records carry no "
                  f"weights): retraining it; its record is replaced by the retrained run's, so that the source-only "
                  f"row and every method starting from it stay one run (numbers can move by float-level effects)")
    for _attempt in range(2):
        if not _finished(rd, rid):
            _train_once(scfg, rd, opts, train_fn)
        rec = runs.read_record(runs.run_dir(rd, rid))
        if rec is not None and rec["status"] != "done":
            raise DalabError(f"source pretraining run {rid} {rec['status']}; lower the lr (--set lr=... or "
                             f"--source-set lr=...) or check the data; delete {runs.run_dir(rd, rid)} to retrain")
        state = runs.load_model(runs.run_dir(rd, rid))  # unreadable: moved aside, None
        if state is not None:
            return state, rid
        (runs.run_dir(rd, rid) / "done").unlink(missing_ok=True)  # not finished any more: retrain it
    raise DalabError(f"source pretraining run {rid} wrote unreadable weights twice; check the disk under {rd}")


def _finished(rd: Path, rid: str) -> bool:
    return runs.is_done(rd, rid) and (runs.run_dir(rd, rid) / "model.pt").is_file()


def _train_once(scfg: RunConfig, rd: Path, opts: RunOptions, train_fn: Callable[..., dict]) -> None:
    """Train the source run unless another process is already on it (then wait for it): the same
    claim files as the benchmark runner, so parallel workers never train it twice."""
    rid = scfg.run_id()
    while not _finished(rd, rid):
        runs.check_stop()
        with runs.claimed(rd, rid) as mine:
            if mine:
                if not _finished(rd, rid):
                    rec = train_fn(scfg, rd, opts, progress=opts.progress, tensorboard=False, save_model=True,
                                   checkpoint_every=opts.checkpoint_every or scfg.eval_every, resume=True)
                    if rec["status"] != "done":
                        raise DalabError(f"source pretraining run {rid} {rec['status']}; lower the lr "
                                         f"(--source-set lr=...) or check the data")
                return
        time.sleep(0.5)  # another process is training it
