"""What makes each method of issue 14 special (one group of test functions per method)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dalab.methods import METHODS, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.optim import lr_factor
from dalab.trainer import RunConfig, train
from conftest import killed_at_step, tiny_batch

KW = dict(device="cpu", progress=False, tensorboard=False)


# --------------------------------------------------------------------------- shot (source-free)

def _shot_cfg(steps: int = 12) -> RunConfig:
    # toy_b: 160 train images, batch 32 -> a refresh (pseudo-labels) every 5 steps: 1, 6, 11
    return RunConfig("shot", "toy_a", "toy_b", steps=steps, eval_every=6, hparams={"batch_size": 32, "beta": 0.3})


@pytest.fixture(scope="module")
def shot_source(tmp_path_factory):
    """The shared source pretraining of :func:`_shot_cfg`, trained once for this module."""
    from dalab.pretrain import source_config

    d = tmp_path_factory.mktemp("shot_source")
    train(source_config(_shot_cfg()), d, **KW)
    return d


def _runs_dir(shot_source, path):
    """A fresh runs dir that already holds the source-pretrained run (a cache hit)."""
    shutil.copytree(shot_source, path)
    return path


def test_shot_adaptation_batches_carry_no_source_data(tmp_path, monkeypatch, shot_source):
    """Through the real trainer: every batch SHOT's update receives has no source tensors (and no
    target labels); pseudo-labels are refreshed once per pass over target train."""
    cls = METHODS["shot"]
    seen, refreshed = [], []
    real_update, real_refresh = cls.update, cls.refresh

    def spy_update(self, batch, step):
        seen.append({k: v is not None for k, v in vars(batch).items()})
        return real_update(self, batch, step)

    def spy_refresh(self, x_tgt, step):
        refreshed.append(step)
        return real_refresh(self, x_tgt, step)

    monkeypatch.setattr(cls, "update", spy_update)
    monkeypatch.setattr(cls, "refresh", spy_refresh)
    rec = train(_shot_cfg(), _runs_dir(shot_source, tmp_path / "r"), **KW)
    assert rec["status"] == "done" and rec["method"]["init_from"].startswith("source_only__")
    assert rec["method"]["uses_source"] is False
    assert len(seen) == 12
    assert all(s == {"x_src": False, "y_src": False, "x_tgt": True, "x_tgt_lab": False, "y_tgt_lab": False,
                     "d_src": False} for s in seen), seen
    assert refreshed == [1, 6, 11]
    assert "pl_loss" in rec["train"]["last_losses"]


def test_shot_source_hypothesis_stays_bitwise_frozen():
    """The head's last layer (the source hypothesis) never changes; the feature extractor does."""
    torch.manual_seed(0)
    cls = METHODS["shot"]
    m = cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, {"beta": 0.3}), 10)
    hyp = {k: v.clone() for k, v in m.net.head[-1].state_dict().items()}
    rest = {k: v.clone() for k, v in m.net.state_dict().items() if not k.startswith("head.4.")}
    m.train()
    m.refresh([tiny_batch(seed=9).x_tgt, tiny_batch(seed=10).x_tgt], 1)
    assert bool(m.labelset.any())
    for step in range(1, 4):
        out = m.train_step(tiny_batch(seed=step, source=False, labeled=False), step)
        assert "pl_loss" in out
    for k, v in m.net.head[-1].state_dict().items():
        assert torch.equal(v, hyp[k]), f"source hypothesis {k} changed"
    assert all(not p.requires_grad for p in m.net.head[-1].parameters())
    moved = [k for k, v in m.net.state_dict().items() if k in rest and not torch.equal(v, rest[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.0.") for k in moved)


def test_shot_pseudo_labels_survive_resume(tmp_path, monkeypatch, shot_source):
    """Killed at step 7 (checkpoint at 4, last refresh at 1), the resumed run's step 5 uses the
    pseudo-labelling state (snapshot, centroids, labelset) restored from the checkpoint: it ends
    bitwise equal to an uninterrupted run; dropping that state on load would not."""
    cls = METHODS["shot"]
    cfg = _shot_cfg()
    for d in "abc":
        _runs_dir(shot_source, tmp_path / d)
    full = train(cfg, tmp_path / "a", save_model=True, checkpoint_every=4, **KW)

    for d in ("b", "c"):
        with killed_at_step(cls, 7), pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / d, checkpoint_every=4, **KW)
    state = torch.load(tmp_path / "b" / cfg.run_id() / "checkpoint.pt", weights_only=False)["method"]["model"]
    assert state["labelset"].any() and "centroids" in state and any(k.startswith("snapshot.") for k in state)

    resumed = train(cfg, tmp_path / "b", resume=True, save_model=True, checkpoint_every=4, **KW)
    assert resumed["evals"] == full["evals"]
    a = torch.load(tmp_path / "a" / cfg.run_id() / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / cfg.run_id() / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    real_load = cls.load_training_state

    def forgets_pseudo_labels(self, st):  # control: the same resume without the restored state
        real_load(self, st)
        self.labelset.zero_()

    monkeypatch.setattr(cls, "load_training_state", forgets_pseudo_labels)
    train(cfg, tmp_path / "c", resume=True, save_model=True, checkpoint_every=4, **KW)
    c = torch.load(tmp_path / "c" / cfg.run_id() / "model.pt", weights_only=True)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- self_ensembling, adamatch

def _make(name: str, steps: int = 10, **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    return cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, over), steps)


# --------------------------------------------------------------------------- self_ensembling

def test_self_ensembling_teacher_is_the_ema_of_the_student():
    """After k steps the teacher's parameters are alpha^k s_0 + sum_j (1 - alpha) alpha^(k-j) s_j,
    computed by hand from the student's parameter history; the teacher is never trained by
    gradient, is in the checkpointed state, and is what evaluation predicts with."""
    a = 0.9  # far from 1, so every step's weight is visible
    m = _make("self_ensembling", teacher_alpha=a, conf_threshold=0.0)
    names = [k for k, _ in m.net.named_parameters()]
    hist = [{k: p.detach().clone() for k, p in m.net.named_parameters()}]
    assert all(torch.equal(p, hist[0][k]) for k, p in m.teacher.named_parameters())  # starts as the student
    opt_params = {id(p) for o in m.optim.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in m.teacher.parameters())
    m.train()
    for step in (1, 2, 3):
        m.train_step(tiny_batch(seed=step, labeled=False), step)
        hist.append({k: p.detach().clone() for k, p in m.net.named_parameters()})
    tea = dict(m.teacher.named_parameters())
    for k in names:
        expected = a ** 3 * hist[0][k] + sum((1 - a) * a ** (3 - j) * hist[j][k] for j in (1, 2, 3))
        assert torch.allclose(tea[k], expected, atol=1e-6, rtol=1e-5), k
    assert any(not torch.equal(tea[k], hist[3][k]) for k in names)   # not just a copy of the student
    assert any(not torch.equal(hist[0][k], hist[3][k]) for k in names)  # the student did train
    assert all(f"teacher.{k}" in m.training_state()["model"] for k in names)
    m.eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(m.predict(x), m.teacher(x)) and not torch.equal(m.predict(x), m.net(x))


def test_self_ensembling_loss_masks_and_balances():
    from dalab.methods.self_ensembling import self_ensembling_loss

    p_tea = torch.tensor([[0.98, 0.01, 0.01], [0.5, 0.3, 0.2]])
    p_stu = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
    loss, logs = self_ensembling_loss(p_stu, p_tea, threshold=0.968, cls_balance=0.0)
    # only the first sample passes: mean over classes of the squared difference, halved by the batch mean
    expected = ((0.18 ** 2 + 0.09 ** 2 + 0.09 ** 2) / 3) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-5) and float(logs["mask_rate"]) == 0.5


# --------------------------------------------------------------------------- adamatch

def _cyclic(a: float) -> torch.Tensor:
    """3 samples with logit ``a`` on their own class, 0 elsewhere: their mean prediction is uniform."""
    return a * torch.eye(3)


def test_adamatch_threshold_is_relative_to_source_confidence():
    """Same target logits, sharper source logits: c_tau = 0.9 x the source's mean confidence rises and
    the mask shrinks. Both batches' mean predictions are uniform, so distribution alignment is the
    identity and every number is by hand: confidence of logits (a, 0, 0) is e^a / (e^a + 2)."""
    from dalab.methods.adamatch import adamatch_pseudo_labels

    conf = lambda a: math.exp(a) / (math.exp(a) + 2)  # noqa: E731
    z_t = torch.cat([_cyclic(2.0), _cyclic(1.0)])            # confidences 0.787 (x3), 0.576 (x3)
    for c, expect in [(1.0, [1] * 6),                        # c_tau = 0.9 * 0.576 = 0.518: all pass
                      (2.0, [1, 1, 1, 0, 0, 0]),             # c_tau = 0.9 * 0.787 = 0.708: the sharp three
                      (4.0, [0] * 6)]:                       # c_tau = 0.9 * 0.965 = 0.868: none
        pseudo, mask, c_tau = adamatch_pseudo_labels(_cyclic(c), z_t, 0.9)
        assert math.isclose(float(c_tau), 0.9 * conf(c), rel_tol=1e-6)
        assert mask.tolist() == expect, (c, mask)
        assert pseudo.tolist() == [0, 1, 2, 0, 1, 2]
    # tau scales the threshold the same way: tau 0.7 at c = 2 gives 0.551 < 0.576, all pass
    assert adamatch_pseudo_labels(_cyclic(2.0), z_t, 0.7)[1].tolist() == [1] * 6


def test_adamatch_distribution_alignment_and_mu_ramp():
    from dalab.methods.adamatch import adamatch_mu, adamatch_pseudo_labels

    # source predicts class 0 more often than the target: aligned target probabilities lean to class 0
    z_s = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    z_t = torch.tensor([[0.0, 0.2]])
    p_s, p_t = torch.softmax(z_s, 1).mean(0), torch.softmax(z_t, 1)
    aligned = p_t * p_s / p_t.mean(0)
    aligned = aligned / aligned.sum()
    pseudo, _, _ = adamatch_pseudo_labels(z_s, z_t, 0.0)
    assert int(pseudo) == int(aligned.argmax()) == 0  # argmax flips from 1 to 0
    assert [round(adamatch_mu(p), 12) for p in (0.0, 0.25, 0.5, 1.0)] == [0.0, 0.5, 1.0, 1.0]


def test_adamatch_update_logs_the_relative_threshold():
    m = _make("adamatch")
    m.train()
    out = m.train_step(tiny_batch(seed=1, labeled=False), 6)
    assert 0.0 < float(out["c_tau"]) <= 0.9 and 0.0 <= float(out["mask_rate"]) <= 1.0
    assert out["mu"] == 1.0  # p = 0.6: past the half-way point the ramp is at its maximum


# --------------------------------------------------------------------------- shared: in-method views

def test_input_views_undo_and_redo_standardisation_and_resume_exactly():
    """Views of a standardised batch equal the sampler's augment-then-standardise of the raw pixels,
    and the same (seed, step) gives the same views (what makes resume exact)."""
    from dalab.augment import InputViews, augment_batch

    torch.manual_seed(0)
    v = InputViews()
    pix = torch.rand(4, 3, 28, 28)
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    gen = v.begin(5, torch.device("cpu"))
    got = v((pix - m) / s, "strong", (mean, std))
    ref_gen = torch.Generator().manual_seed(int(v.seed) * 1_000_003 + 5)
    ref = (augment_batch(pix, "strong", ref_gen) - m) / s
    assert torch.allclose(got, ref, atol=1e-5) and gen is v.gen
    v.begin(5, torch.device("cpu"))
    assert torch.equal(v((pix - m) / s, "strong", (mean, std)), got)
    v.begin(6, torch.device("cpu"))
    assert not torch.equal(v((pix - m) / s, "strong", (mean, std)), got)


# --------------------------------------------------------------------------- mcd, adda

def _make_on(name: str, steps: int = 10, backbone: str = "lenet", **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    return cls(build_classifier(backbone, 10), 10, resolve_hparams(cls, over), steps)


# --------------------------------------------------------------------------- mcd

def test_mcd_takes_2_plus_num_k_optimizer_steps_and_sets_each_lr_once_per_step():
    """Per batch: step A (G and C), step B (C), num_k steps C (G); every optimizer's LR is the DANN
    schedule's value for that training step in all of them (set once per step, not per call)."""
    m = _make_on("mcd", steps=10, optimizer="sgd", lr=0.01, lr_schedule="dann", num_k=4)
    calls: list[tuple[int, str, list[float]]] = []
    current = [0]
    for name, opt in m.optim.optimizers.items():
        def recording_step(*a, _name=name, _opt=opt, _real=opt.step, **k):
            calls.append((current[0], _name, [g["lr"] for g in _opt.param_groups]))
            return _real(*a, **k)
        opt.step = recording_step
    m.train()
    for step in (1, 2):
        current[0] = step
        m.train_step(tiny_batch(seed=step, labeled=False), step)
        assert m.optim.steps_taken == 2 + 4  # backward + step calls: A, B, 4 x C
        names = [n for s, n, _ in calls if s == step]
        assert names == ["G", "C", "C", "G", "G", "G", "G"]
        expected = 0.01 * lr_factor("dann", (step - 1) / 10)
        lrs = [lr for s, _, group_lrs in calls if s == step for lr in group_lrs]
        assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12, abs=0)
    lr1 = {lr for s, _, g in calls if s == 1 for lr in g}
    lr2 = {lr for s, _, g in calls if s == 2 for lr in g}
    assert len(lr1) == len(lr2) == 1 and lr1 != lr2  # one value per step, annealed between steps


def test_mcd_step_b_leaves_the_generator_and_step_c_the_classifiers_alone():
    m = _make_on("mcd", num_k=1)
    m.train()
    snap = lambda mod: [p.detach().clone() for p in mod.parameters()]  # noqa: E731
    real_step, log = m.step, []

    def checking_step(loss, *names, **kw):
        g0, c0 = snap(m.net.backbone), snap(m.net.head) + snap(m.head2)
        real_step(loss, *names, **kw)
        g_moved = any(not torch.equal(a, b) for a, b in zip(g0, snap(m.net.backbone)))
        c_moved = any(not torch.equal(a, b) for a, b in zip(c0, snap(m.net.head) + snap(m.head2)))
        log.append((names, g_moved, c_moved))
    m.step = checking_step
    m.train_step(tiny_batch(seed=1, labeled=False), 1)
    assert log == [(("G", "C"), True, True), (("C",), False, True), (("G",), True, False)]


# --------------------------------------------------------------------------- adda

def test_adda_source_encoder_and_head_are_bitwise_frozen():
    """The target encoder starts as the source encoder; after several updates the source encoder
    (weights and BatchNorm statistics) and the classifier head are bitwise unchanged and belong to
    no optimizer, while the target encoder and the discriminator moved."""
    m = _make_on("adda", backbone="lenet_bn")
    src0 = {k: v.clone() for k, v in m.src_encoder.state_dict().items()}
    head0 = {k: v.clone() for k, v in m.net.head.state_dict().items()}
    tgt0 = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    disc0 = {k: v.clone() for k, v in m.disc.state_dict().items()}
    assert src0.keys() == tgt0.keys() and all(torch.equal(src0[k], tgt0[k]) for k in src0)
    in_optim = {id(p) for o in m.optim.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert not in_optim & {id(p) for p in [*m.src_encoder.parameters(), *m.net.head.parameters()]}
    assert set(m.optim.optimizers) == {"T", "D"}
    m.train()
    assert not m.src_encoder.training
    for step in range(1, 6):
        out = m.train_step(tiny_batch(seed=step, labeled=False), step)
        assert torch.isfinite(out["loss"])
    assert all(torch.equal(v, m.src_encoder.state_dict()[k]) for k, v in src0.items())
    assert all(torch.equal(v, m.net.head.state_dict()[k]) for k, v in head0.items())
    assert any(not torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in tgt0.items() if "running" not in k)
    assert any(not torch.equal(v, m.disc.state_dict()[k]) for k, v in disc0.items())


def test_adda_defaults_are_the_papers_adam():
    m = _make_on("adda")
    for opt in m.optim.optimizers.values():
        assert isinstance(opt, torch.optim.Adam)
        assert all(g["betas"] == (0.5, 0.999) and g["lr"] == 2e-4 for g in opt.param_groups)
    assert [m.disc[i].out_features for i in (0, 2, 4)] == [500, 500, 1]
