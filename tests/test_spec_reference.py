"""docs/spec.md is generated from the spec's definition, complete, and its defaults make sense."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from dalab.bench import DEFAULT_EVAL_POINTS, BenchSpec, expand
from dalab.benchmarks import spec_reference
from dalab.utils import DalabError

ROOT = Path(__file__).resolve().parent.parent


def test_committed_spec_reference_is_the_generated_one():
    assert (ROOT / "docs" / "spec.md").read_text() == spec_reference.markdown(), \
        "docs/spec.md is stale: run `make docs` (python -m dalab.benchmarks.spec_reference --write)"


def test_every_key_is_documented_with_type_default_and_meaning():
    doc = spec_reference.markdown()
    for f in fields(BenchSpec):
        assert f.metadata.get("type") and f.metadata.get("help"), f"BenchSpec.{f.name} needs type= and help="
        assert re.search(rf"^\| `{f.name}` \| .+ \| .+ \| .+ \|$", doc, re.M), f.name
    assert "| `extends` |" in doc


def test_the_complete_example_is_every_key_at_its_default():
    block = re.search(r"```yaml\n(.*?)```", spec_reference.markdown(), re.S).group(1)
    raw = yaml.safe_load(block)
    assert set(raw) == {f.name for f in fields(BenchSpec)}
    assert BenchSpec.from_dict(raw) == BenchSpec()


def test_defaults_suit_the_builtin_digits():
    s = BenchSpec()
    assert s.backbone == "lenet_bn"  # the main job's network
    for steps in (1, 3, 10, 300, 500, 2000):  # at least 4 evaluation points (or one per step)
        e = BenchSpec.from_dict({"steps": steps}).eval_every
        assert len(range(e, steps + 1, e)) >= min(DEFAULT_EVAL_POINTS, steps)
    assert BenchSpec.from_dict({"steps": 500}).eval_every == 125  # the main job's pair
    assert BenchSpec.from_dict({"steps": 300, "eval_every": 50}).eval_every == 50  # given: kept


def test_a_computed_default_is_computed_from_the_merged_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 400\nmethods: [source_only]\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsteps: 800\n")
    (tmp_path / "fixed.yaml").write_text("extends: base.yaml\neval_every: 40\n")
    assert BenchSpec.from_yaml(tmp_path / "base.yaml").eval_every == 100
    assert BenchSpec.from_yaml(tmp_path / "child.yaml").eval_every == 200  # not the parent's 100
    assert BenchSpec.from_yaml(tmp_path / "fixed.yaml").eval_every == 40
    (tmp_path / "bad.yaml").write_text("steps: 0\n")
    (tmp_path / "bad_child.yaml").write_text("extends: bad.yaml\nsteps: 10\n")
    with pytest.raises(DalabError, match="bad.yaml: field 'steps'"):  # the parent is checked on its own
        BenchSpec.from_yaml(tmp_path / "bad_child.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_specs_state_what_the_defaults_would_change(path):
    """Their run ids (records committed under results/) must never move with a default."""
    raw = BenchSpec._read(path)
    assert {"steps", "eval_every", "backbone"} <= set(raw), path.name


def test_an_error_names_the_key_and_what_it_means(tmp_path):
    with pytest.raises(DalabError) as e:
        BenchSpec.from_dict({"eval_every": 0})
    assert "field 'eval_every' must be an integer >= 1, got 0" in str(e.value)
    assert f"eval_every: {BenchSpec.help('eval_every')}" in str(e.value) and "docs/spec.md" in str(e.value)
    with pytest.raises(DalabError, match=r"did you mean 'backbone'\?.*see docs/spec.md"):
        BenchSpec.from_dict({"backbon": "lenet"})


def test_a_spec_without_backbone_and_eval_every_runs_the_main_jobs_network(tmp_path):
    s = BenchSpec.from_dict({"methods": ["source_only"], "pairs": [["toy_a", "toy_b"]], "seeds": [0], "steps": 8})
    (cfg, _), = expand(s)
    assert cfg.backbone == "lenet_bn" and cfg.eval_every == 2
