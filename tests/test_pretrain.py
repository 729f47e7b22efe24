"""Source pretraining is a shared, cached step: the source_only run of the same pair/seed/backbone,
trained once, its weights loaded by every method with ``init_from_source``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import dalab.trainer as trainer
from dalab.methods import METHODS, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.pretrain import source_config
from dalab.trainer import RunConfig, train
from dalab.utils import DalabError


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


def test_a_committed_source_record_without_weights_is_retrained_with_a_warning(runs_dir, capsys):
    """Records are committed, weights never: on a fresh clone a two-phase method retrains its source
    run, says so, and the source run's record is the retrained one (the table's source-only row and
    the method's starting point stay one run)."""
    kw = dict(source="toy_a", target="toy_b", steps=4, eval_every=4, budget="2")
    train(RunConfig("finetune", **kw), runs_dir, progress=False, tensorboard=False)
    src_id = source_config(RunConfig("finetune", **kw)).run_id()
    (runs_dir / src_id / "model.pt").unlink()                     # as on a fresh clone
    capsys.readouterr()
    rec = train(RunConfig("frozen_features", **kw), runs_dir, progress=False, tensorboard=False)
    err = capsys.readouterr().err
    assert f"source run {src_id} is finished but its weights are not under" in err and "retraining it" in err
    assert rec["method"]["init_from"] == src_id and (runs_dir / src_id / "model.pt").is_file()
    assert (runs_dir / src_id / "done").is_file()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_source_model_follows_the_declaration(name):
    """Read off the registry: a method that starts from the source model (``starts_from_source`` at
    its defaults) has the source_only run of its pair, seed and backbone as its source model, names
    that model's hyperparameters in its run id, and keeps the source backbone it is built on (its
    ``build()`` adds to the network, it does not re-create it); a method that starts from scratch
    has no source model, and source hyperparameters are not part of its id."""
    cls = METHODS[name]
    hp = resolve_hparams(cls, {})
    cfg = RunConfig(name, "toy_a", "toy_b", budget="0" if "0" in cls.label_budgets else "2", steps=4,
                    backbone="lenet_bn" if cls.batchnorm_needed(hp) else "lenet")
    other_source = replace(cfg, source_hparams={"lr": 0.03})
    if not cls.starts_from_source(hp):
        with pytest.raises(DalabError, match="does not start from a source model"):
            source_config(cfg)
        assert other_source.run_id() == cfg.run_id()
        return
    src = source_config(cfg)
    assert (src.method, src.source, src.target, src.seed, src.backbone) == ("source_only", "toy_a", "toy_b", 0,
                                                                            cfg.backbone)
    assert other_source.run_id() != cfg.run_id()
    torch.manual_seed(0)
    net = build_classifier(cfg.backbone, 10)
    source = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    m = cls(net, 10, hp, 4)
    kept = m.net.backbone.state_dict()
    if cls.batch_statistics:  # test-batch BatchNorm (test-time methods): the running statistics are dropped
        source = {k: v for k, v in source.items() if k.rsplit(".", 1)[-1] not in
                  ("running_mean", "running_var", "num_batches_tracked")}
    assert set(source) <= set(kept), f"{name} renamed parts of the source backbone"
    for k, v in source.items():
        assert torch.equal(kept[k], v), f"{name}'s build() changed the source backbone's {k}"


def test_an_option_can_turn_the_source_start_off():
    ff = METHODS["frozen_features"]
    assert ff.starts_from_source(resolve_hparams(ff, {}))
    assert not ff.starts_from_source(resolve_hparams(ff, {"features": "backbone_init"}))
    assert RunConfig("frozen_features", "toy_a", "toy_b", budget="2",
                     hparams={"features": "backbone_init"}).source_run_hparams() is None
