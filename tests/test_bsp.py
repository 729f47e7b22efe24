"""BSP (batch spectral penalization) as an option any method that sees source and target takes
(issue 23 item 5): the paper's penalty against a hand computation, the method's own features,
every adversarial method, and a one-line refusal where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batch
from dalab.augment import BatchSpectralPenalty
from dalab.methods import get_method, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.runs import RunConfig


def build(name: str, **over):
    torch.manual_seed(0)
    cls = get_method(name)
    hp = resolve_hparams(cls, over)
    m = cls(build_classifier("lenet_bn", 10), 10, hp, 100)
    from dalab.augment import extra_terms
    m.extra_terms = extra_terms(hp, 10)
    return m


def by_hand(f: torch.Tensor, k: int) -> torch.Tensor:
    return (torch.linalg.svdvals(f.double())[:k] ** 2).sum()


@pytest.mark.parametrize("k", [1, 3])
def test_penalty_is_the_sum_of_squared_top_k_singular_values_of_both_domains(k):
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(16, 50, generator=g), torch.randn(16, 50, generator=g) + 1.0

    class Fake:
        step_features = (f_s, f_t)

    loss, logs = BatchSpectralPenalty(1e-4, k)(Fake(), None)
    want = by_hand(f_s, k) + by_hand(f_t, k)
    assert abs(float(logs["bsp_loss"]) - float(want)) <= 1e-5 * float(want)
    assert abs(float(loss) - 1e-4 * float(want)) <= 1e-9 * float(want)


@pytest.mark.parametrize("name", ["dann", "cdan", "mdd", "mcd", "adda"])
def test_bsp_changes_the_update_of_adversarial_methods_and_is_logged(name):
    batch = tiny_batch(16)
    outs, grads = {}, {}
    for bsp in (0.0, 1e-2):
        m = build(name, bsp=bsp)
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        outs[bsp] = m.train_step(batch, 1)
        grads[bsp] = [(before[k] - v.detach()).abs().sum() for k, v in m.named_parameters()]
    assert "bsp_loss" in outs[1e-2] and "bsp_loss" not in outs[0.0] and float(outs[1e-2]["bsp_loss"].detach()) > 1e-3
    assert any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(grads[0.0], grads[1e-2]))


def test_bsp_penalises_the_features_the_method_computed():
    """DANN's own forward on cat(source, target) is recorded and penalised: no extra forward."""
    m = build("dann", bsp=1e-4)
    calls = []
    real = m.features
    m.features = lambda x: calls.append(len(x)) or real(x)
    batch = tiny_batch(8)
    m.train_step(batch, 1)
    assert calls == [16] and m.step_features is None  # one joint forward; cleared after the step


def test_bsp_is_out_of_run_ids_at_its_default_and_in_them_when_set():
    base = RunConfig("dann", "mnist5k", "ucidigits", hparams={})
    assert base.run_id() == RunConfig("dann", "mnist5k", "ucidigits", hparams={"bsp": 0.0}).run_id()
    assert base.run_id() != RunConfig("dann", "mnist5k", "ucidigits", hparams={"bsp": 1e-4}).run_id()


@pytest.mark.parametrize("method", ["source_only", "shot"])
def test_bsp_without_both_domains_is_one_error_line(method, tmp_path, capsys):
    from dalab.cli import main

    rc = main(["run", "--method", method, "--source", "toy_a", "--target", "toy_b", "--steps", "2",
               "--set", "bsp=1e-4", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: bsp penalises source and target features together") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
