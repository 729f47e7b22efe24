"""Splits, label budgets and the offline digits domains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalab.datasets import labeled_indices, load_domain, parse_budget, stratified_split
from dalab.utils import DalabError


def test_split_is_deterministic_stratified_and_disjoint():
    y = np.repeat(np.arange(10), 50)
    a, b = stratified_split(y, 0), stratified_split(y, 0)
    assert (a == b).all()
    assert (a != stratified_split(y, 1)).any()
    for s in range(3):
        counts = np.bincount(y[a == s], minlength=10)
        assert counts.min() == counts.max() > 0  # every class equally in every split
    assert np.bincount(a).tolist() == [340, 80, 80]  # 50 per class -> 34 / 8 / 8


def test_label_budget():
    y = np.repeat(np.arange(10), 20)
    assert len(labeled_indices(y, 0, 0)) == 0
    k3 = labeled_indices(y, 3, 0)
    assert np.bincount(y[k3]).tolist() == [3] * 10
    assert (k3 == labeled_indices(y, "3", 0)).all()
    assert len(labeled_indices(y, "all", 0)) == 200
    with pytest.raises(DalabError, match="larger than"):
        labeled_indices(y, 21, 0)
    for bad in ("-1", "many", None):
        with pytest.raises(DalabError):
            parse_budget(bad)


@pytest.mark.parametrize("name,n", [("mnist5k", 5000), ("ucidigits", 1797)])
def test_offline_digits_domains(name, n):
    d = load_domain(name)
    assert len(d.train) + len(d.val) + len(d.test) == n
    assert d.classes == [str(i) for i in range(10)]
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 28, 28)
    x, y = next(d.train.batches(16))
    assert x.shape == (16, 3, 28, 28) and x.min() >= -1 and x.max() <= 1
    # MNIST framing: the 4-pixel border is (almost) empty for the resampled UCI digits
    if name == "ucidigits":
        assert d.train.images[:, :, :4, :].float().mean() == 0


def test_sampler_is_seeded():
    d = load_domain("toy_a")
    a = next(d.train.sampler(8, torch.Generator().manual_seed(3)))[1]
    b = next(d.train.sampler(8, torch.Generator().manual_seed(3)))[1]
    assert torch.equal(a, b)
