"""Source pretraining, shared by every method that starts from a source-trained model.

The source-pretrained network for (source, target, seed, backbone, pretrained weights, steps,
eval_every, split_seed) IS the ``source_only`` run of that configuration: in a benchmark grid the
baseline row and the starting point of ``finetune``/``frozen_features``/``arch_mod`` are the same
run, trained once. If that run is finished (``done`` marker) and saved its weights (``model.pt``)
under the same runs dir, they are loaded; otherwise it is trained through the one loop,
:func:`dalab.trainer.train` (there is no second training loop).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dalab.utils import DalabError


def source_config(cfg):
    """The ``source_only`` RunConfig a method run with config ``cfg`` starts from. Only the pair,
    seed, backbone, step budget, split, precision and input standardisation define it: the method's
    own hyperparameters (and its augmentation/mixup/VAT options) do not."""
    from dalab.trainer import RunConfig

    hp = {k: cfg.hparams[k] for k in ("standardize",) if k in cfg.hparams}
    return RunConfig("source_only", cfg.source, cfg.target, seed=cfg.seed, budget="0", steps=cfg.steps,
                     eval_every=cfg.eval_every, backbone=cfg.backbone, pretrained=cfg.pretrained,
                     split_seed=cfg.split_seed, precision=cfg.precision, hparams=hp)


def source_pretrained(cfg, runs_dir: str | Path, device: str = "auto", data_root: str | None = None,
                      progress: bool = False) -> tuple[dict, str]:
    """(state dict of the source-trained Classifier on CPU, run id it came from); trains the
    ``source_only`` run first when it is not cached."""

    scfg = source_config(cfg)
    run_dir = Path(runs_dir) / scfg.run_id()
    weights = run_dir / "model.pt"
    if not ((run_dir / "done").is_file() and weights.is_file()):
        _train_once(scfg, Path(runs_dir), device, progress, data_root)
    elif json.loads((run_dir / "record.json").read_text())["status"] != "done":
        raise DalabError(f"source pretraining run {scfg.run_id()} did not finish; delete {run_dir} to retrain")
    return torch.load(weights, map_location="cpu", weights_only=True), scfg.run_id()


def _train_once(scfg, runs_dir: Path, device: str, progress: bool, data_root: str | None) -> None:
    """Train the source run unless another worker is already on it (then wait for it): the
    same claim files as the benchmark runner, so parallel workers never train it twice."""
    import time

    from dalab.bench import release_claim, try_claim
    from dalab.trainer import train

    rid = scfg.run_id()
    done = lambda: (runs_dir / rid / "done").is_file() and (runs_dir / rid / "model.pt").is_file()  # noqa: E731
    while not done():
        if try_claim(runs_dir, rid):
            try:
                if not done():
                    rec = train(scfg, runs_dir, device=device, progress=progress, tensorboard=False,
                                data_root=data_root)
                    if rec["status"] != "done":
                        raise DalabError(f"source pretraining run {rid} {rec['status']}; "
                                         f"lower the lr (--set lr=...) or check the data")
            finally:
                release_claim(runs_dir, rid)
            return
        time.sleep(1.0)  # another worker is training it
