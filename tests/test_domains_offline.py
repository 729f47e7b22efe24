"""The offline digits suite: every domain builds from pip-package files, deterministically, in
the common format; syndigits holds fonts out; the build cache round-trips; pairs and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalab.cli import main
from dalab.datasets import BENCHMARKS, DEFAULT_PAIRS, DOMAINS, PAIRS, load_domain
from dalab.datasets import mnist_variants as mv
from dalab.datasets import syndigits as sd
from dalab.datasets.base import DomainData
from dalab.datasets.cache import cache_path, cached
from dalab.datasets.grid import offline_domains

# Facts about the files the domains are built from (a new domain needs no entry here: the format
# test below runs over the registry).
SIZES = {"mnist5k": 5000, "ucidigits": 1797, "syndigits": 9900, "mnistm5k": 5000,
         "mnist5k_rot": 5000, "mnist5k_color": 5000}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_offline_domain_sizes(name):
    assert name in offline_domains()
    d = load_domain(name, split_seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == SIZES[name]


@pytest.mark.parametrize("name", sorted(offline_domains()))
def test_offline_domain_format(name):
    d = load_domain(name, split_seed=0)
    assert d.classes == [str(i) for i in range(10)] and d.input_shape == (3, 28, 28)
    for split in (d.train, d.val, d.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] in ((1, 28, 28), (3, 28, 28))
        assert torch.bincount(split.labels, minlength=10).min() > 0  # all 10 classes in every split
    x, y = next(d.train.batches(32))
    assert x.shape == (32, 3, 28, 28) and -1 <= x.min() < x.max() <= 1
    assert d.train.images.float().std() > 20  # not blank


def test_syndigits_test_and_val_fonts_are_unseen_in_train():
    assert len(set(sd.TRAIN_FONTS + sd.VAL_FONTS + sd.TEST_FONTS)) == 22
    spec = DOMAINS["syndigits"]
    data = spec.builder()
    fonts = np.asarray(data.info["fonts"])[np.asarray(data.info["font_id"])]
    by_split = [set(fonts[data.split.numpy() == s]) for s in range(3)]
    assert by_split == [set(sd.TRAIN_FONTS), set(sd.VAL_FONTS), set(sd.TEST_FONTS)]
    assert not (by_split[0] & by_split[2]) and not (by_split[0] & by_split[1])
    # the fixed font split ignores split_seed
    assert torch.equal(load_domain("syndigits", 0).test.labels, load_domain("syndigits", 5).test.labels)


def test_every_font_renders_every_digit_distinctly():
    x, y, f = sd.render_syndigits(sd.TRAIN_FONTS + sd.VAL_FONTS + sd.TEST_FONTS, 1, seed=3)
    assert x.shape == (220, 3, 28, 28) and y.tolist() == list(range(10)) * 22
    assert (x.float().flatten(1).std(1) > 10).all()  # every image has a visible glyph


def test_renderers_are_deterministic_given_the_seed():
    a = sd.render_syndigits(("cmr10", "DejaVuSans"), 2, seed=1)
    b = sd.render_syndigits(("cmr10", "DejaVuSans"), 2, seed=1)
    c = sd.render_syndigits(("cmr10", "DejaVuSans"), 2, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    p = mv.photo_patches(6, np.random.default_rng(0))
    assert torch.equal(p, mv.photo_patches(6, np.random.default_rng(0))) and p.shape == (6, 3, 28, 28)


@pytest.mark.parametrize("name", ["mnistm5k", "mnist5k_rot", "mnist5k_color"])
def test_mnist_variants_rebuild_identically_and_keep_labels(name):
    fresh = getattr(mv, name).__wrapped__()  # bypass the cache
    again = DOMAINS[name].builder()           # from the cache (or a second build)
    assert torch.equal(fresh.images, again.images) and torch.equal(fresh.labels, again.labels)
    assert torch.equal(fresh.labels, DOMAINS["mnist5k"].builder().labels)


def test_mnistm_blend_is_the_absolute_difference():
    digit = torch.tensor([0, 255, 100], dtype=torch.uint8).view(1, 1, 1, 3)
    patch = torch.tensor([[10, 10, 250], [200, 0, 50], [7, 7, 7]], dtype=torch.uint8).view(1, 3, 1, 3)
    out = mv.blend_mnistm(digit, patch)
    assert out.view(3, 3).tolist() == [[10, 245, 150], [200, 255, 50], [7, 248, 93]]


def test_cache_builds_once_rebuilds_on_new_version_and_on_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("DALAB_CACHE", str(tmp_path))
    calls = []

    def make(version):
        @cached(version)
        def toy_cached() -> DomainData:
            calls.append(version)
            return DomainData(torch.arange(8, dtype=torch.uint8).view(2, 1, 2, 2), torch.tensor([0, 1]),
                              ["a", "b"], split=torch.tensor([0, 2]), info={"k": [1, 2]})
        return toy_cached

    first = make("v1")()
    second = make("v1")()
    assert calls == ["v1"] and cache_path("toy_cached", "v1").is_file()
    assert torch.equal(first.images, second.images) and torch.equal(second.split, torch.tensor([0, 2]))
    assert second.classes == ["a", "b"] and second.info == {"k": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["toy_cached-v1.pt"]  # no temp file left behind
    make("v2")()
    assert calls == ["v1", "v2"]
    cache_path("toy_cached", "v1").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="rebuilding"):
        make("v1")()
    assert calls == ["v1", "v2", "v1"]


def test_pairs_name_registered_domains():
    assert len(DEFAULT_PAIRS) >= 4 and BENCHMARKS["digits"] == DEFAULT_PAIRS
    assert {("mnist5k", "ucidigits"), ("ucidigits", "mnist5k"), ("syndigits", "mnist5k"),
            ("mnist5k", "mnistm5k")} <= set(DEFAULT_PAIRS)
    for s, t in PAIRS:
        assert s in DOMAINS and t in DOMAINS and s != t
    assert len(BENCHMARKS["office31"]) == 6 and len(BENCHMARKS["officehome"]) == 12
    assert len(BENCHMARKS["domainnet"]) == 30 and BENCHMARKS["visda"] == [("visda_train", "visda_validation")]


def test_list_shows_every_domain_and_pair(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, d in DOMAINS.items():
        assert (name in out) != d.hidden
    for s, t in PAIRS:
        assert f"{s}->{t}" in out


def test_show_domains_writes_one_grid_per_domain(tmp_path, capsys):
    from PIL import Image

    assert main(["show-domains", "ucidigits", "syndigits", "--out", str(tmp_path), "--n", "3"]) == 0
    for name in ("ucidigits", "syndigits"):
        img = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert img.shape == (10 * (28 * 3 + 2) + 2, 3 * (28 * 3 + 2) + 2, 3)
        assert img.std() > 20
    assert "wrote" in capsys.readouterr().out


def test_shift_table_is_generated_from_records(tmp_path):
    from dalab import runs
    from dalab.datasets.shift_table import shift_table

    def rec(method, seed, budget, tgt, src):
        d = tmp_path / f"{method}{seed}"
        point = {"step": 10, "src_val": {"acc": src}, "tgt_val": {"acc": tgt}, "tgt_test": {"acc": tgt}}
        runs.write_record(d, {
            "run_id": d.name, "status": "done", "method": {"name": method, "family": "baseline", "budget": budget},
            "config": {"method": method, "source": "mnist5k", "target": "ucidigits", "seed": seed, "budget": budget,
                       "steps": 10},
            "evals": [point], "final": point, "train": {"steps": 10}})
        runs.mark_done(d, "done")

    rec("source_only", 0, "0", 0.5, 0.9)
    rec("source_only", 1, "0", 0.7, 1.0)
    rec("target_only", 0, "all", 0.95, 0.1)
    from dalab import display

    name = display.pair("mnist5k", "ucidigits")  # tables show display names
    row = [line for line in shift_table(tmp_path).splitlines() if line.startswith(f"| {name}")][0]
    assert "0.500 / 0.700" in row and "0.600 ± 0.141" in row and "| 0.950 | +0.350 |" in row
    assert row.endswith("0.950 (n=1) |")
    assert "(no runs)" in shift_table(tmp_path, pairs=[("syndigits", "mnist5k")])
