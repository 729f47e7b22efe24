"""Tasks with several source domains (issue 25): the source side defined once (dalab.tasks), the
per-domain balanced sampler and each sample's domain index, records and tables naming the sources,
single-source ids unchanged, domain generalization's no-target guarantee, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalab.cli import main
from dalab.runs import RunConfig, RunOptions
from dalab.tasks import check_sources, join_sources, source_domains
from dalab.trainer import build_method, build_streams, load_task, start_run, train
from dalab.utils import DalabError

ROOT = Path(__file__).resolve().parents[1]
KW = dict(device="cpu", progress=False, tensorboard=False)


def ms_cfg(method: str = "source_only", source: str = "toy_a+toy_b", target: str = "toy_c", **hp) -> RunConfig:
    return RunConfig(method, source, target, steps=4, eval_every=2, backbone="lenet_bn", precision="fp32",
                     hparams={"batch_size": 16, **hp})


# --------------------------------------------------------------------------- the concept, once

def test_sources_are_one_field_read_one_way():
    assert source_domains("mnist5k") == ["mnist5k"]
    assert source_domains("a+b+c") == ["a", "b", "c"] == RunConfig("dann", "a+b+c", "d").sources
    assert join_sources(["a", "b"]) == "a+b"
    assert check_sources("toy_a+toy_b", "toy_c") == ["toy_a", "toy_b"]


@pytest.mark.parametrize("results", ["digits", "partial", "openset", "tta"])
def test_single_source_run_ids_are_unchanged(results):
    """Committed single-source records (closed, label-set and test-time tasks): the id their
    config gives is still their id, and their task has one source, named as it always was."""
    from dalab.runs import key_id

    recs = sorted((ROOT / "results" / results / "runs").glob("*/record.json"))[:15]
    assert recs, f"results/{results}'s committed records are missing"
    for path in recs:
        rec = json.loads(path.read_text())
        c = rec["config"]
        assert source_domains(c["source"]) == [c["source"]]
        assert key_id(c) == rec["run_id"]
        cfg = RunConfig(c["method"], c["source"], c["target"], seed=c["seed"], budget=c["budget"], steps=c["steps"],
                        eval_every=c["eval_every"], backbone=c["backbone"], pretrained=c["pretrained"],
                        split_seed=c["split_seed"], precision=c["precision"], hparams=c["hparams"],
                        source_hparams=c["source_hparams"] or {}, classes=c.get("classes"))
        if c["source_hparams"] is None or cfg.source_run_hparams() is not None:
            assert cfg.key() == c and cfg.run_id() == rec["run_id"]
        assert "domains" not in rec["data"]["source"] and "sampling" not in rec["data"]["source"]


# --------------------------------------------------------------------------- sampling

def _task(cfg: RunConfig):
    run = start_run(cfg, Path("/nonexistent"), Path("/nonexistent/x"), RunOptions(progress=False, device="cpu"))
    task = load_task(run)
    build_method(run, task)
    return run, task


def test_batches_are_balanced_per_domain_and_carry_each_samples_domain():
    """Every step draws batch_size from each source domain, in source order, each part from its
    own domain's train split, and every domain's stream is a shuffled pass over it."""
    run, task = _task(ms_cfg(source="toy_a+toy_c", target="toy_b"))
    parts = task.source_parts()
    assert [len(p) for p in parts] == [len(d.train) for d in task.sources]
    streams = build_streams(run, task)
    rows = [{tuple(r.flatten().tolist()) for x, _ in p.batches(512) for r in x} for p in parts]
    seen = [[] for _ in parts]
    steps = len(parts[0]) // 16
    for _ in range(steps):
        b = streams.batch()
        assert b.d_src.tolist() == [0] * 16 + [1] * 16  # balanced, in source order
        assert b.x_tgt is None and b.x_tgt_lab is None
        for d in range(2):
            for x in b.x_src[b.d_src == d]:
                key = tuple(x.flatten().tolist())
                assert key in rows[d]
                seen[d].append(key)
    for d in range(2):  # one pass: no sample twice within an epoch of its domain
        assert len(set(seen[d])) == len(seen[d]) == steps * 16


def test_single_source_batches_carry_no_domain_index():
    run, task = _task(RunConfig("dann", "toy_a", "toy_b", steps=2, backbone="lenet_bn", hparams={"batch_size": 8}))
    assert task.sources is None
    b = build_streams(run, task).batch()
    assert b.d_src is None and len(b.x_src) == 8


# --------------------------------------------------------------------------- records and tables

def test_an_existing_method_runs_on_merged_sources_and_the_record_names_them(tmp_path):
    from dalab.display import pair, pair_name
    from dalab.tables import parse_pair, run_command

    rec = train(ms_cfg("dann"), tmp_path, **KW)
    assert rec["run_id"].startswith("dann__toy_a+toy_b-toy_c__b0__s0__")
    assert pair_name(rec) == "toy_a+toy_b→toy_c" == parse_pair("Toy A + Toy B -> Toy C")
    assert pair("toy_a+toy_b", "toy_c") == "Toy A + Toy B → Toy C"
    src = rec["data"]["source"]
    assert list(src["domains"]) == ["toy_a", "toy_b"] and "balanced" in src["sampling"]
    assert src["train"] == sum(d["train"] for d in src["domains"].values())
    assert "--sources toy_a,toy_b" in run_command(rec)


def test_cli_sources_flag_gives_the_same_run(runs_dir, capsys):
    args = ["run", "--method", "source_only", "--sources", "toy_a,toy_b", "--target", "toy_c", "--steps", "2",
            "--eval-every", "2", "--backbone", "lenet_bn", "--precision", "fp32", "--quiet", "--runs-dir",
            str(runs_dir), "--set", "batch_size=8"]
    assert main(args) == 0
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.endswith(".claim")]
    assert run.name == RunConfig("source_only", "toy_a+toy_b", "toy_c", steps=2, eval_every=2, backbone="lenet_bn",
                                 precision="fp32", hparams={"batch_size": 8}).run_id()


def test_spec_keys_for_several_sources():
    """A spec names a multi-source task by a list as a pair's source, or leave_one_out: (each domain
    the target of the others); `methods: all` leaves multi-source methods out of single-source grids."""
    from dalab.bench import BenchSpec, expand, resolve_methods, resolve_pairs
    from dalab.methods import METHODS

    assert resolve_pairs([[["toy_a", "toy_b"], "toy_c"], ["toy_a", "toy_b"]]) == [("toy_a+toy_b", "toy_c"),
                                                                                 ("toy_a", "toy_b")]
    spec = BenchSpec.from_dict({"leave_one_out": ["toy_a", "toy_b", "toy_c"], "methods": ["source_only"],
                                "seeds": [0], "steps": 2})
    assert [(c.source, c.target) for c, _ in expand(spec)] == [("toy_b+toy_c", "toy_a"), ("toy_a+toy_c", "toy_b"),
                                                               ("toy_a+toy_b", "toy_c")]
    single = resolve_methods(BenchSpec(methods="all"))
    assert not [m for m in single if METHODS[m].min_sources > 1]
    multi = resolve_methods(BenchSpec(methods="all", leave_one_out=["toy_a", "toy_b", "toy_c"]))
    assert set(single) <= set(multi)
    for raw, needle in [({"leave_one_out": ["toy_a", "toy_b"]}, "at least 3"),
                        ({"leave_one_out": ["toy_a", "toy_b", "toy_a"]}, "names a domain twice"),
                        ({"leave_one_out": ["toy_a", "toy_b", "toy_c"], "pairs": [["toy_a", "toy_b"]]}, "replaces"),
                        ({"pairs": [[["toy_a", 3], "toy_b"]]}, "a list of domains")]:
        with pytest.raises(DalabError, match=needle):
            BenchSpec.from_dict(raw)


def test_leave_one_domain_out_validation_tasks_and_grid():
    """DomainBed's leave-one-domain-out CV: each source in turn held out as the target of the others;
    a spec's leave_one_out_cv trains those runs too, after the tasks its tables show."""
    from dalab.bench import BenchSpec, expand, table_pairs
    from dalab.tasks import held_out_tasks

    assert held_out_tasks("a+b+c") == [("b+c", "a"), ("a+c", "b"), ("a+b", "c")]
    assert held_out_tasks("a+b") == [] and held_out_tasks("a") == []
    four = ["mnist5k", "mnistm5k", "syndigits", "ucidigits"]
    spec = BenchSpec.from_dict({"leave_one_out": four, "leave_one_out_cv": True, "methods": ["source_only", "vrex"],
                                "seeds": [0, 1], "steps": 2})
    tasks = [(c.source, c.target) for c, _ in expand(spec)]
    shown = table_pairs(spec)
    assert len(shown) == 4 and len(tasks) == 2 * 2 * (4 + 4 * 3)  # methods x seeds x (tasks + their 3 validation runs)
    assert ("syndigits+ucidigits", "mnistm5k") in tasks  # mnist5k's task, mnistm5k held out
    assert tasks[:4] == [t for t in shown for _ in range(2)][:4]  # the shown tasks first
    for raw, needle in [({"leave_one_out": four[:3], "leave_one_out_cv": True}, "at least 4 domains"),
                        ({"leave_one_out_cv": True}, "at least 4 domains"),
                        ({"leave_one_out": four, "leave_one_out_cv": "yes"}, "true or false")]:
        with pytest.raises(DalabError, match=needle):
            BenchSpec.from_dict(raw)


def _run(source: str, target: str, tgt_val: list[float], seed: int = 0) -> dict:
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    evals = [{"step": 10 * (i + 1), "src_val": m(0.9), "tgt_val": m(a), "tgt_test": m(a)} for i, a in enumerate(tgt_val)]
    return {"run_id": f"irm__{source}-{target}__b0__s{seed}", "status": "done", "method": {"name": "irm"},
            "config": {"method": "irm", "source": source, "target": target, "seed": seed, "steps": 20},
            "evals": evals, "final": evals[-1]}


def test_the_lodo_rule_reads_only_the_held_out_source_domains():
    from dalab.selection import attach_held_out, select

    outer = _run("a+b+c", "d", [0.30, 0.90])  # the target's own validation would pick step 20
    inner = [_run("b+c", "a", [0.6, 0.2]), _run("a+c", "b", [0.5, 0.4]), _run("a+b", "c", [0.7, 0.3])]
    other_seed = _run("b+c", "a", [0.0, 1.0], seed=1)  # another seed's run is not a validation run of seed 0
    got = {r["run_id"]: r for r in attach_held_out([outer, *inner, other_seed])}[outer["run_id"]]
    assert [e["lodo"] for e in got["evals"]] == pytest.approx([0.6, 0.3])
    assert select(got, "lodo")["step"] == 10 and select(got, "oracle")["step"] == 20
    relabeled = _run("a+b+c", "d", [0.99, 0.01])  # other target labels: the same scores
    again = {r["run_id"]: r for r in attach_held_out([relabeled, *inner])}[outer["run_id"]]
    assert [e["lodo"] for e in again["evals"]] == [e["lodo"] for e in got["evals"]]
    assert "lodo" not in outer["evals"][0]  # the records given are not modified
    partial = {r["run_id"]: r for r in attach_held_out([outer, *inner[:2]])}[outer["run_id"]]
    assert select(partial, "lodo") is None  # a validation run missing: the rule is not available


# --------------------------------------------------------------------------- bad input

def _different_classes():
    from dalab.datasets.base import DomainData
    from dalab.datasets.digits import toy_a

    d = toy_a()
    return DomainData(d.images, d.labels, [f"letter_{c}" for c in d.classes])


@pytest.fixture
def letters_domain(monkeypatch):
    from dalab.datasets.base import DOMAINS, DomainSpec

    monkeypatch.setitem(DOMAINS, "toy_letters", DomainSpec("toy_letters", _different_classes, "toy",
                                                           "toy A with other class names", hidden=True))


@pytest.mark.parametrize("side,needle", [
    (["--sources", "toy_a,toy_c", "--target", "toy_c"], "the target 'toy_c' is also one of the sources"),
    (["--sources", "toy_a,toy_a", "--target", "toy_c"], "'toy_a' is named twice"),
    (["--sources", "toy_a,,toy_b", "--target", "toy_c"], "an empty domain name"),
    (["--sources", "toy_a,toy_zz", "--target", "toy_c"], "unknown domain 'toy_zz'"),
    (["--sources", "toy_a,toy_letters", "--target", "toy_c"], "different class lists"),
])
def test_bad_sources_one_line_exit_2_nothing_written(side, needle, runs_dir, capsys, letters_domain):
    args = ["run", "--method", "dann", *side, "--steps", "2", "--quiet", "--backbone", "lenet_bn",
            "--runs-dir", str(runs_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not runs_dir.exists() or not any(p.is_dir() for p in runs_dir.iterdir())


@pytest.mark.parametrize("method,side,extra,needle", [
    ("m3sda", ["--source", "toy_a"], [], "needs at least 2 source domains"),
    ("vrex", ["--source", "toy_a"], [], "needs at least 2 source domains"),
    ("vrex", ["--sources", "toy_a,toy_b"], ["--set", "vat=1"], "domain-generalization method: it sees no target data"),
    ("irm", ["--sources", "toy_a,toy_b"], ["--budget", "5"], "does not support target-label budget"),
    ("dann_dg", ["--sources", "toy_a,toy_b"], ["--set", "mixup=cross"], "uses no unlabeled target data"),
])
def test_a_method_given_what_it_cannot_use_is_refused(method, side, extra, needle, runs_dir, capsys):
    args = ["run", "--method", method, *side, "--target", "toy_c", "--steps", "2", "--quiet", "--backbone",
            "lenet_bn", "--runs-dir", str(runs_dir), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not runs_dir.exists() or not any(p.is_dir() for p in runs_dir.iterdir())


# --------------------------------------------------------------------------- domain generalization

def test_a_dg_method_sees_no_target_data_anywhere(tmp_path, monkeypatch):
    """Every batch of a DG run holds source data with its domains and no target field; the hooks
    that could carry target inputs (on_train_start, deployed, on_train_end) get None."""
    from dalab.methods import METHODS

    cls = METHODS["vrex"]
    seen = {"steps": 0, "hooks": []}
    real_update = cls.update

    def update(self, batch, step):
        assert batch.x_tgt is None and batch.x_tgt_lab is None and batch.y_tgt_lab is None
        assert batch.d_src is not None and batch.d_src.bincount().tolist() == [16, 16]
        seen["steps"] += 1
        return real_update(self, batch, step)

    monkeypatch.setattr(cls, "update", update)
    monkeypatch.setattr(cls, "on_train_start", lambda self, x: seen["hooks"].append(x))
    monkeypatch.setattr(cls, "on_train_end", lambda self, x, lab: seen["hooks"].extend([x, lab]))
    rec = train(ms_cfg("vrex"), tmp_path, **KW)
    assert seen["steps"] == 4 and seen["hooks"] == [None, None, None]
    assert rec["method"]["target_data"] == "none" and rec["status"] == "done"


def test_the_batch_construction_asserts_a_target_free_run_gets_no_target():
    """The trainer's guard itself: a target stream in a target-free run's Streams is a bug, caught
    when the batch is built (and build_streams never makes one for a DG method)."""
    from itertools import repeat

    from dalab.trainer import Streams

    x, y = torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long)
    ok = Streams(repeat((x, y)), None, None, None, False, target_free=True)
    assert ok.batch().x_tgt is None
    leaky = Streams(repeat((x, y)), repeat((x, y)), None, None, False, target_free=True)
    with pytest.raises(AssertionError, match="target-free"):
        leaky.batch()
    run, task = _task(ms_cfg("dann_dg"))
    streams = build_streams(run, task)
    assert streams.target_free and streams.tgt is None and streams.lab is None


@pytest.mark.parametrize("method", ["m3sda", "ms_dann", "mdan", "dg_coral", "vrex", "groupdro", "irm", "mixstyle", "dann_dg"])
def test_each_multi_domain_method_runs_through_the_trainer(method, tmp_path):
    cfg = RunConfig(method, "toy_a+toy_b", "toy_c", steps=2, eval_every=2, backbone="lenet_bn", precision="fp32",
                    hparams={"batch_size": 8})
    rec = train(cfg, tmp_path, **KW)
    assert rec["status"] == "done" and rec["config"]["source"] == "toy_a+toy_b"
