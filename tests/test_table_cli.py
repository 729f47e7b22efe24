"""dalab table's filters name only what the records hold (a typo: one error line with a
did-you-mean, exit 2), `dalab list METHOD`, and --explain's complete reproduce command."""

from __future__ import annotations

import json
import shlex

import pytest

from dalab.cli import build_parser, main, parse_sets
from dalab.methods import METHODS, SHARED_HPARAMS
from dalab.runs import RunConfig, key_id


def _ev(step, acc):
    m = {"acc": acc, "bal_acc": acc, "macro_f1": acc}
    return {"step": step, "src_val": m, "tgt_val": m, "tgt_test": m, "tgt_train_unsup": {"im": 0.0}}


def _record(cfg: RunConfig, acc: float, family: str) -> dict:
    key = cfg.key()  # what the trainer stores as a record's config
    return {"run_id": key_id(key), "status": "done", "config": key, "hparams": key["hparams"],
            "method": {"name": cfg.method, "family": family, "target_data": "unlabeled", "budget": "0"},
            "evals": [_ev(cfg.steps, acc)], "final": _ev(cfg.steps, acc),
            "train": {"steps": cfg.steps, "wall_time_s": 1.0, "steps_per_s": 10.0}}


def _folder(tmp_path, cfgs) -> str:
    d = tmp_path / "my runs"
    for i, (cfg, family) in enumerate(cfgs):
        rec = _record(cfg, 0.5 + 0.01 * i, family)
        (d / rec["run_id"]).mkdir(parents=True)
        (d / rec["run_id"] / "record.json").write_text(json.dumps(rec))
        (d / rec["run_id"] / "done").write_text("done\n")
    return str(d)


def _cfg(method, seed=0, **kw):
    return RunConfig(method, "mnist5k", "ucidigits", seed=seed, steps=20, eval_every=10, backbone="lenet_bn",
                     precision="fp32", **kw)


@pytest.fixture
def runs(tmp_path):
    return _folder(tmp_path, [(_cfg("source_only", s), "baseline") for s in (0, 1)]
                   + [(_cfg("dann", s, hparams={"trade_off": 0.5}), "adversarial") for s in (0, 1)])


@pytest.mark.parametrize("args, needle", [
    (["--methods", "dnn"], "--methods: no runs of 'dnn' under {runs} (did you mean 'dann'?); "
                           "methods there: dann, source_only"),
    (["--methods", "dann,Source onyl"], "no runs of 'Source onyl' under {runs} (did you mean 'Source only'?)"),
    (["--methods", "mdd"], "no runs of 'mdd' under"),  # a real method, but never run here
    (["--pairs", "mnist5k:ucidigit"], "--pairs: no runs on 'mnist5k:ucidigit' under {runs} "
                                      "(did you mean 'mnist5k:ucidigits'?); pairs there: mnist5k:ucidigits"),
    (["--pairs", "ucidigits:mnist5k"], "no runs on 'ucidigits:mnist5k'"),
    (["--rules", "last,src_vall"], "unknown selection rule 'src_vall' (did you mean 'src_val'?)"),
    (["--budgets", "5"], "--budgets: no runs with label budget '5' under"),
    (["--baseline", "source_onyl"], "--baseline: no runs of 'source_onyl' under {runs} (did you mean"),
    (["--explain", "dnn", "mnist5k:ucidigits"], "--explain METHOD: no runs of 'dnn' under"),
    (["--explain", "dann", "mnist5k:ucidgits"], "--explain PAIR: no runs on 'mnist5k:ucidgits'"),
    (["--rule", "orcle", "--explain", "dann", "mnist5k:ucidigits"], "unknown selection rule 'orcle' (did you mean 'oracle'?)"),
])
def test_an_unknown_name_is_one_error_line_with_a_did_you_mean(runs, tmp_path, capsys, args, needle):
    assert main(["table", runs, "--out", str(tmp_path / "out"), *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.format(runs=runs) in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_known_names_in_any_spelling_still_filter(runs, capsys):
    assert main(["table", runs, "--format", "csv", "--rules", "last", "--methods", "DANN,source_only",
                 "--pairs", "MNIST-5k → UCI digits", "--budgets", "0"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["source_only", "dann"]


def test_list_method_prints_its_hyperparameters(capsys):
    assert main(["list", "cdan"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("cdan: CDAN+E (adversarial)")
    for name, h in {**SHARED_HPARAMS, **METHODS["cdan"].hparams}.items():  # every one, with default and help
        line = next(ln for ln in lines if ln.split()[:1] == [name])
        assert line.split()[1] == str(h.default), line
    assert "log [0.1, 3]" in out and "weight of the conditional domain loss" in out  # space, help
    assert next(ln for ln in lines if ln.split()[:1] == ["bn_mode"]).split()[1] == "split"  # cdan's own default
    assert "the main job (benchmarks/digits.yaml) sets: lr=0.03" in out
    assert main(["list", "cdam"]) == 2
    assert "unknown method 'cdam' (did you mean 'cdan'?)" in capsys.readouterr().err


def _as_dalab_run(cmd: str) -> RunConfig:
    """The RunConfig `dalab run` builds from a command line (as cmd_run does)."""
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    return RunConfig(method=args.method, source=args.source, target=args.target, seed=args.seed,
                     budget=args.budget, steps=args.steps, eval_every=args.eval_every, backbone=args.backbone,
                     pretrained=args.pretrained, precision=args.precision, hparams=parse_sets(args.set),
                     source_hparams=parse_sets(args.source_set)), args


def test_explain_prints_a_complete_reproduce_command(tmp_path, capsys):
    adda = _cfg("adda", hparams={"lr": 0.0005, "disc_depth": 3}, source_hparams={"lr": 0.03, "weight_ema": 0.99})
    runs = _folder(tmp_path, [(adda, "adversarial"), (_cfg("dann", hparams={"trade_off": 0.3}), "adversarial")])
    for method, rid in (("adda", adda.run_id()), ("dann", None)):
        assert main(["table", runs, "--explain", method, "mnist5k:ucidigits"]) == 0
        cmd = next(ln.split("reproduce: ", 1)[1] for ln in capsys.readouterr().out.splitlines() if "reproduce: " in ln)
        cfg, args = _as_dalab_run(cmd)
        assert args.runs_dir == runs  # where the source model and the record are
        rec = json.loads(next((tmp_path / "my runs").glob(f"{method}__*/record.json")).read_text())
        assert cfg.run_id() == rec["run_id"], cmd  # the same run: hyperparameters and source model
        if rid:
            assert "--source-set lr=0.03" in cmd and "--source-set weight_ema=0.99" in cmd and "--set lr=0.0005" in cmd
            assert "--set momentum" not in cmd  # the method's defaults are left out
