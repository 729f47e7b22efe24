"""Source pretraining is a shared, cached step: the source_only run of the same pair/seed/backbone,
trained once, its weights loaded by every method with ``init_from_source``."""

from __future__ import annotations

import torch

import dalab.trainer as trainer
from dalab.pretrain import source_config
from dalab.trainer import RunConfig, train


def test_pretraining_runs_once_and_is_reused(runs_dir, monkeypatch):
    calls = []
    real_train = trainer.train

    def counting_train(cfg, *a, **kw):
        calls.append(cfg.method)
        return real_train(cfg, *a, **kw)

    monkeypatch.setattr(trainer, "train", counting_train)  # what dalab.pretrain calls
    kw = dict(source="toy_a", target="toy_b", steps=4, eval_every=4, budget="2")
    ft = train(RunConfig("finetune", **kw), runs_dir, progress=False, tensorboard=False)
    src_id = source_config(RunConfig("finetune", **kw)).run_id()
    assert calls == ["source_only"] and ft["method"]["init_from"] == src_id
    assert (runs_dir / src_id / "model.pt").is_file() and (runs_dir / src_id / "done").is_file()

    # a second method, and the same finetune run again: cache hits, nothing retrained
    ff = train(RunConfig("frozen_features", **kw), runs_dir, progress=False, tensorboard=False, save_model=True)
    again = train(RunConfig("finetune", **kw), runs_dir, progress=False, tensorboard=False)
    assert calls == ["source_only"] and ff["method"]["init_from"] == src_id
    assert again["final"] == ft["final"]  # a cache hit changes nothing (seeding happens after it)

    # frozen_features really starts from (and keeps) the source backbone
    src = torch.load(runs_dir / src_id / "model.pt", weights_only=True)
    mine = torch.load(runs_dir / ff["run_id"] / "model.pt", weights_only=True)
    for k, v in src.items():
        if k.startswith("backbone."):
            assert torch.equal(mine[k], v), k

    # the benchmark's own source_only row is that very run
    rec = train(RunConfig("source_only", **{**kw, "budget": "0"}), runs_dir, progress=False, tensorboard=False)
    assert rec["run_id"] == src_id and rec["method"]["init_from"] is None


def test_which_methods_start_from_source():
    from dalab.methods import METHODS, resolve_hparams

    starts = {n for n, c in METHODS.items() if c.starts_from_source(resolve_hparams(c, {}))}
    assert starts == {"finetune", "frozen_features", "arch_mod", "adda", "shot"}  # two-phase methods
    ff = METHODS["frozen_features"]
    assert not ff.starts_from_source(resolve_hparams(ff, {"features": "backbone_init"}))
