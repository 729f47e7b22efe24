"""The ``dalab`` command.

    dalab list
    dalab run --method dann --source mnist5k --target ucidigits --seed 0 [--steps N] [--set lr=0.01]

Bad input prints one ``error: ...`` line naming the problem and the fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import shlex
import sys
from typing import Sequence

from dalab.utils import DalabError


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it or not it.split("=", 1)[0]:
            raise DalabError(f"bad --set {it!r}: use --set NAME=VALUE, e.g. --set lr=0.01")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def list_method(name: str) -> str:
    """``dalab list METHOD``: what the method is and every hyperparameter it takes -- its own, then
    the shared ones and the data options -- with default, search space and meaning, and what the
    main job (benchmarks/digits.yaml) sets."""
    import textwrap
    from pathlib import Path

    from dalab.benchmarks.methods_table import BUDGET_TEXT, space_text
    from dalab.methods import SHARED_HPARAMS, get_method
    from dalab.methods.base import DATA_HPARAMS

    cls = get_method(name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    out = [f"{name}: {cls.display} ({cls.family})" + (f" -- {cls.paper}" if cls.paper else ""),
           f"  target data: {cls.target_data.value}; label budgets: "
           f"{', '.join(BUDGET_TEXT[b] for b in cls.label_budgets)}; starts from: "
           f"{'the source_only run' if cls.init_from_source else 'scratch'}"]
    out += textwrap.wrap(" ".join(doc.split()), 106, initial_indent="  ", subsequent_indent="  ")

    def table(title: str, items) -> None:
        out.append(title)
        out.append(f"    {'name':<18} {'default':<10} {'search space':<28} what it is")
        for k, h in items:
            mark = " *" if k in SHARED_HPARAMS and k in cls.hparams else ""
            head = f"    {k:<18} {str(h.default):<10} {space_text(h):<28} "
            if len(head) > 63:  # a long search space: the meaning goes under it
                out.append(head.rstrip())
                head = " " * 63
            out.append(textwrap.fill(h.help + mark, 120, initial_indent=head, subsequent_indent=" " * 63))

    own = [(k, h) for k, h in cls.hparams.items()]
    table(f"hyperparameters of {name} (--set NAME=VALUE, or a spec's hparams: {{{name}: {{NAME: VALUE}}}}):"
          if own else f"{name} has no hyperparameters of its own", own)
    if any(k in SHARED_HPARAMS for k in cls.hparams):
        out.append("    * a shared hyperparameter whose default this method sets (above)")
    table("shared by every method:", [(k, h) for k, h in SHARED_HPARAMS.items()
                                      if k not in DATA_HPARAMS and k not in cls.hparams])
    table("data options (any method):", [(k, h) for k, h in DATA_HPARAMS.items() if k not in cls.hparams])
    main = Path(__file__).resolve().parent / "benchmarks" / "digits.yaml"
    if not main.is_file():  # installed layout: dalab/benchmarks/; editable: the repo's benchmarks/
        import dalab.benchmarks as b
        main = Path(b.__file__).resolve().parent / "digits.yaml"
    if main.is_file():
        from dalab.bench import BenchSpec, trial_hparams
        sets = trial_hparams(name, 0, BenchSpec.from_yaml(main))
        out.append("the main job (benchmarks/digits.yaml) sets: "
                   + (", ".join(f"{k}={v}" for k, v in sorted(sets.items())) if sets else "nothing (the defaults)"))
    return "\n".join(out)


def cmd_list(args) -> int:
    if args.method:
        print(list_method(args.method))
        return 0
    if args.markdown:  # the README's methods table
        from dalab.benchmarks.methods_table import data_options_markdown, markdown
        print(markdown())
        print()
        print(data_options_markdown())
        return 0
    import textwrap

    from dalab.datasets import DOMAINS
    from dalab.methods import METHODS

    print("methods:")
    from dalab.benchmarks.methods_table import settings_text
    print(f"  {'name':<16} {'family':<14} {'target data':<18} {'label budgets':<14} {'settings':<19} paper")
    for name, cls in sorted(METHODS.items(), key=lambda kv: (kv[1].family, kv[0])):
        paper = cls.paper.split(". http")[0] if cls.paper else ""
        print(f"  {name:<16} {cls.family:<14} {cls.target_data.value:<18} {','.join(cls.label_budgets):<14} "
              f"{settings_text(cls):<19} {paper}")
    from dalab.methods.base import DATA_HPARAMS
    print("data options (any method; --set NAME=VALUE, or a spec's hparams/variants):")
    for name, h in DATA_HPARAMS.items():
        print(textwrap.fill(h.help, 110, initial_indent=f"  {name:<13} {str(h.default):<6} ",
                            subsequent_indent=" " * 23))
    print("speed options (dalab run/bench): --precision auto|fp32|bf16 (part of a run's identity), "
          "--no-channels-last, --compile")
    print("domains:")
    for name, d in sorted(DOMAINS.items(), key=lambda kv: (kv[1].family, kv[0])):
        if not d.hidden or args.all:
            print(f"  {name:<22} {d.family:<11} {d.description}")
    from dalab.datasets.pairs import LABEL_SETS
    from dalab.tasks import HEADLINE, SETTINGS, LabelSet
    print("settings (label sets; dalab run --setting NAME or --classes SHARED:SRC_PRIVATE:TGT_PRIVATE, a spec's "
          "setting:/classes:), on any pair:")
    for name, what in SETTINGS.items():
        split = f"classes {LabelSet(**LABEL_SETS[name]).text():<12}" if name in LABEL_SETS else f"{'all classes':<20}"
        print(textwrap.fill(f"{split} {HEADLINE[name][1]}; {what}", 110, initial_indent=f"  {name:<11} ",
                            subsequent_indent=" " * 14))
    from dalab.datasets import BENCHMARKS
    print("pairs (source->target; 'digits' is the default offline benchmark):")
    for bench, pairs in BENCHMARKS.items():
        text = ", ".join(f"{s}->{t}" for s, t in pairs)
        print(textwrap.fill(text, 110, initial_indent=f"  {bench:<13} ", subsequent_indent=" " * 16))
    return 0


def cmd_show_domains(args) -> int:
    from dalab.datasets.grid import offline_domains, write_grid

    names = args.domains or offline_domains()
    for name in names:
        print(f"wrote {write_grid(name, args.out, n=args.n, root=args.data_root)}")
    return 0


def add_run_options(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The options of how a run executes (:class:`dalab.runs.RunOptions`), shared by ``dalab run``
    and ``dalab bench`` so a benchmark's runs get every one of them."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--data-root", default=None, help="root folder of datasets read from disk")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write checkpoint.pt every N steps (atomic)" + ("; default: each run's eval_every" if bench else ""))
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (slower); CPU runs are deterministic anyway")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW layout for conv backbones")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (GPU / long runs)")
    p.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard events")
    p.add_argument("--log-every", type=int, default=50, metavar="N", help="log losses every N steps")
    p.add_argument("--save-model", action="store_true", help="also write the final weights to model.pt")


def run_options(args, **fixed):
    """The :class:`dalab.runs.RunOptions` of ``dalab run`` / ``dalab bench`` arguments."""
    from dalab.runs import RunOptions

    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise DalabError(f"--checkpoint-every {args.checkpoint_every} must be >= 1")
    if args.log_every < 1:
        raise DalabError(f"--log-every {args.log_every} must be >= 1")
    return RunOptions(device=args.device, data_root=args.data_root, checkpoint_every=args.checkpoint_every,
                      deterministic=args.deterministic, channels_last=not args.no_channels_last,
                      compile=args.compile, tensorboard=not args.no_tensorboard, log_every=args.log_every,
                      save_model=args.save_model, **fixed)


INTERRUPTED = "interrupted; rerun the same command to resume"


def cmd_run(args) -> int:
    from dalab import runs
    from dalab.tasks import classes_key, join_sources
    from dalab.trainer import RunConfig, train, validate
    from dalab.utils import check_writable

    if args.download:
        import os
        os.environ["DALAB_DOWNLOAD"] = "1"  # read by the torchvision-backed domains
    source = args.source if args.sources is None else join_sources([s.strip() for s in args.sources.split(",")])
    cfg = RunConfig(method=args.method, source=source, target=args.target, seed=args.seed,
                    budget=args.budget, steps=args.steps, eval_every=args.eval_every,
                    backbone=args.backbone, pretrained=args.pretrained, precision=args.precision,
                    hparams=parse_sets(args.set), source_hparams=parse_sets(args.source_set),
                    classes=classes_key(args.setting, args.classes))
    validate(cfg)  # bad input: one line, nothing written, before the claim
    check_writable(args.runs_dir, "--runs-dir")
    cfg = cfg.for_device(args.device)  # the id names the precision this device computes in
    opts = run_options(args, progress=not args.quiet, resume=True)  # a rerun continues from its checkpoint
    rid = cfg.run_id()
    from dalab import distributed
    ddp = distributed.init_from_env(args.device)  # under torchrun: this process is one rank of the run
    main = not ddp or ddp.is_main
    clean = False
    try:
        # rank 0 (or the only process) holds the run's claim; other ranks follow it
        with runs.claimed(args.runs_dir, rid) if main else contextlib.nullcontext(True) as mine:
            if not mine:
                o = runs.claim_owner(args.runs_dir, rid) or {}
                raise DalabError(f"run {rid} is being trained right now by pid {o.get('pid', '?')} on "
                                 f"{o.get('host', '?')}; wait for it to finish (its record will be in "
                                 f"{args.runs_dir}/{rid}/) or stop that process")
            finished = runs.is_done(args.runs_dir, rid) if main else None
            finished = ddp.broadcast(finished) if ddp else finished  # rank 0 decides for all
            if finished and not args.force:  # a finished run is never retrained or touched by a rerun
                rec = runs.read_record(runs.run_dir(args.runs_dir, rid))
                if main:
                    print(f"{rid} is already finished: nothing retrained (--force trains it again; this "
                          f"result stays until the new one has finished)")
            else:
                if finished and main:
                    runs.set_aside(args.runs_dir, rid)  # read in its place until the new attempt finishes
                rec = train(cfg, args.runs_dir, opts)
                if main:
                    runs.drop_previous(args.runs_dir, rid)
        clean = True
    finally:
        distributed.shutdown(clean)
    code = print_run(rec, args.runs_dir) if main else (0 if rec["status"] == "done" else 1)  # rank 0 prints
    if ddp:
        distributed.exit_process(code)  # never returns
    return code


def print_run(rec: dict, runs_dir) -> int:
    """The finished run in a few lines; the exit code of `dalab run` (1 if it stopped early)."""
    f = rec["final"]
    if rec["status"] != "done":
        print(f"{rec['run_id']}: {rec['status']} at step {rec['train']['diverged_at']} "
              f"(last losses {rec['train']['last_losses']})")
        return 1
    print(f"{rec['run_id']}  ({rec['train']['steps_per_s']:.1f} steps/s, {rec['train']['wall_time_s']:.1f} s)")
    for split in ("src_val", "tgt_val", "tgt_test"):
        m = f[split]
        extra = "".join(f"  {k} {m[k]:.4f}" for k in ("os_star", "unk", "h_score", "os") if k in m)
        print(f"  {split:<9} acc {m['acc']:.4f}  bal_acc {m['bal_acc']:.4f}  macro_f1 {m['macro_f1']:.4f}{extra}")
    print(f"  record: {runs_dir}/{rec['run_id']}/record.json")
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from dalab.bench import BenchSpec, expand, grid_records, grid_report, launch, run_state, write_grid_tables

    from dalab.distributed import launched
    if launched():
        raise DalabError("dalab bench runs whole grids, not one run over several processes: under torchrun "
                         "use `dalab run ...`; spread a grid with --jobs N or --launcher slurm")
    from dalab.utils import check_writable
    for opt, value, ok, need in (("--jobs", args.jobs, args.jobs >= 1, "an integer >= 1"),
                                 ("--probe-steps", args.probe_steps, args.probe_steps >= 0, "an integer >= 0"),
                                 ("--step-time", args.step_time, args.step_time is None or args.step_time > 0,
                                  "a number of seconds > 0")):
        if not ok:
            raise DalabError(f"{opt} {value} is not valid: give {need}")
    spec = BenchSpec.from_yaml(args.spec)
    if args.runs_dir:
        spec.runs_dir = args.runs_dir
    if args.out:
        spec.out = args.out
    skipped: list[str] = []
    groups: dict = {}  # the spec's searches (pooled rows) and row names, for the tables
    grid = expand(spec, skipped, groups)  # validates every run before anything is trained or written
    for msg in skipped:
        print(msg)
    grid = [(cfg.for_device(args.device), t) for cfg, t in grid]  # ids name the precision computed
    opts = run_options(args, progress=False, resume=True)
    rd = Path(spec.runs_dir)
    if not args.dry_run:  # both folders are checked (creating neither) before the first run
        check_writable(spec.runs_dir, "runs_dir (--runs-dir)")
        check_writable(spec.out, "out (--out)")
    states = [run_state(rd, cfg.run_id()) for cfg, _ in grid]
    n_done = states.count("done")
    print(f"{spec.name}: {len(grid)} runs ({n_done} done, {len(grid) - n_done} to run) -> {spec.runs_dir}")
    if args.dry_run:
        for (cfg, trial), st in zip(grid, states):
            print(f"  {st:<8} {cfg.run_id()}" + (f"  trial {trial}" if spec.trials > 1 else ""))
        from dalab.cost import check_inputs, estimate  # data and weights present, and what the grid costs
        domains = check_inputs(grid, args.data_root, spec.pretrained, spec.backbone)
        for line in estimate(spec, grid, states, domains, args.jobs, args.device, args.probe_steps, args.step_time):
            print(line)
        return 0
    import time
    t0 = time.perf_counter()
    results = launch(spec, grid, launcher=args.launcher, jobs=args.jobs, opts=opts, progress=True)
    wall = time.perf_counter() - t0
    failed = [r for r in results if r[1].startswith("failed")]
    records = grid_records(spec, grid)
    from dalab.selection import CHANCE_MARK, at_chance
    chance = [r["run_id"] for r in records if at_chance(r)]
    attempted = {rid for rid, _ in results}
    print(f"grid finished in {wall:.0f} s: {len(results)} runs attempted, "
          f"{sum(r[1] == 'diverged' for r in results)} diverged, {len(failed)} failed, "
          f"{sum(rid in attempted for rid in chance)} at chance")
    if chance:  # finished, but never learned the source task: kept in the tables, marked
        print(f"warning: {len(chance)} run(s) of this grid ended with source-validation accuracy at chance "
              f"(marked {CHANCE_MARK} in the tables): {', '.join(chance[:3])}{' ...' if len(chance) > 3 else ''}; "
              f"the network never learned the source task (too few steps, the lr, or the BatchNorm-free lenet: "
              f"try backbone: lenet_bn)")
    trained = [r for r in records if r["run_id"] in {rid for rid, st in results if st in ("done", "diverged")}]
    if trained:
        from dalab.bench import write_timing
        write_timing(spec, trained, wall, args.jobs if args.launcher == "local" else 1,
                     args.command or f"dalab bench {args.spec}")
    for path in write_grid_tables(spec, grid, groups, args.command or f"dalab bench {args.spec}", records):
        print(f"wrote {path}")
    missing, reasons = grid_report(rd, grid)
    if missing:  # never exit 0 while the tables miss runs of this grid
        print(f"{missing} of {len(grid)} runs of this grid are not finished; the tables lack them:", file=sys.stderr)
        for line in reasons:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _table_command(args, out: str) -> str:
    """The ``dalab table`` command line that regenerates these files (for their headers)."""
    cmd = f"dalab table {args.runs_dir} --out {out} --rules {args.rules}"
    for opt in ("methods", "pairs", "budgets"):
        if getattr(args, opt):
            cmd += f" --{opt} {getattr(args, opt)}"
    cmd += f" --spec {args.spec}" if args.spec else ""
    for opt in ("caption", "label"):
        if getattr(args, opt):
            cmd += f" --{opt} {shlex.quote(getattr(args, opt))}"
    return cmd + (f" --baseline {args.baseline}" if args.baseline != "source_only" else "")


def _check_present(option: str, what: str, given: list[str], present: dict[str, str], runs_dir: str) -> None:
    """Every name given to ``option`` must be among ``present`` (accepted spelling -> name shown):
    a typo is one error line with a did-you-mean, never empty tables. ``what``: "of", "on" or
    "with label budget" (no runs WHAT 'name')."""
    from dalab.datasets.base import closest

    plural = {"of": "methods", "on": "pairs", "with label budget": "label budgets"}[what]
    for g in given:
        if g not in present:
            shown = sorted(set(present.values()))
            raise DalabError(f"{option}: no runs {what} {g!r} under {runs_dir}{closest(g, present)}; "
                             f"{plural} there: {', '.join(shown[:20])}{' ...' if len(shown) > 20 else ''}")


def check_table_names(records: list[dict], runs_dir: str, methods: list[str] | None = None,
                      pairs: list[str] | None = None, budgets: list[str] | None = None, groups: dict | None = None,
                      method_option: str = "--methods", pair_option: str = "--pairs") -> None:
    """The methods (registry, display or row names), pairs (SOURCE:TARGET) and label budgets a
    ``dalab table`` filter names must be in the records."""
    from dalab import display
    from dalab.tables import pair_name, parse_pair

    if methods:
        present = {}
        for r in records:
            present[r["method"]["name"]] = present[display.method(r["method"]["name"])] = r["method"]["name"]
        if any(m not in present for m in methods):  # a row's own name ('DANN (trade_off=0.1)', a spec's name)
            from dalab.tables import build_table
            for row in build_table(records, "last", groups=groups)["rows"]:
                present.setdefault(row["display"], row["method"])
        _check_present(method_option, "of", methods, present, runs_dir)
    if pairs:
        keys = {pair_name(r) for r in records}
        present = {k.replace("→", ":"): k.replace("→", ":") for k in keys}  # spelled SOURCE:TARGET
        for p in pairs:
            if parse_pair(p) not in keys:
                _check_present(pair_option, "on", [p], present, runs_dir)
    if budgets:
        present = {str(r["method"]["budget"]): str(r["method"]["budget"]) for r in records}
        _check_present("--budgets", "with label budget", budgets, present, runs_dir)


def cmd_table(args) -> int:
    from dalab.selection import get_rule
    from dalab.tables import (build_table, explain, load_records, parse_method, parse_pair, to_csv, to_latex,
                              to_markdown, write_tables)

    records = load_records(args.runs_dir)
    if not records:
        raise DalabError(f"no finished runs under {args.runs_dir}; run `dalab bench SPEC` or `dalab run` first")
    groups: dict = {}  # --spec: pool the trials of the searches it declares, name its rows
    if args.spec:
        from dalab.bench import BenchSpec, expand
        expand(BenchSpec.from_yaml(args.spec), [], groups)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    check_table_names(records, args.runs_dir, budgets=split(args.budgets), groups=groups)
    if args.baseline != "source_only":
        check_table_names(records, args.runs_dir, [args.baseline], method_option="--baseline")
    if args.explain:
        check_table_names(records, args.runs_dir, [args.explain[0]], [args.explain[1]], groups=groups,
                          method_option="--explain METHOD", pair_option="--explain PAIR")
        print(explain(records, args.explain[0], args.explain[1], get_rule(args.rule).name, parse_method(args.baseline),
                      args.budgets.split(",") if args.budgets else None, groups, runs_dir=args.runs_dir))
        return 0
    rules = [get_rule(r).name for r in split(args.rules)]
    check_table_names(records, args.runs_dir, split(args.methods), split(args.pairs), groups=groups)
    pairs = [parse_pair(p) for p in split(args.pairs)] if args.pairs else None
    methods = [parse_method(m) for m in split(args.methods)] if args.methods else None
    budgets, baseline = split(args.budgets), parse_method(args.baseline)
    if pairs:
        records = [r for r in records if f"{r['config']['source']}→{r['config']['target']}" in pairs]
    if not args.format or args.out:
        out = args.out or "results/tables"
        command = args.command or _table_command(args, out)
        for path in write_tables(records, out, rules, command, pairs, baseline=baseline, methods=methods,
                                 budgets=budgets, groups=groups, caption_text=args.caption, label=args.label):
            print(f"wrote {path}", file=sys.stderr if args.format else sys.stdout)
    if args.format:
        tables = [build_table(records, r, pairs, baseline, methods, budgets, groups) for r in rules]
        if args.format == "csv":
            sys.stdout.write(to_csv(tables))
        else:
            if args.format == "md":
                sys.stdout.write("\n".join(to_markdown(t, caption_text=args.caption) for t in tables))
            else:
                sys.stdout.write("\n".join(to_latex(t, caption_text=args.caption, label=f"{args.label}-{t['rule']}"
                                                     if args.label else "") for t in tables))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dalab", description="domain-adaptation lab")
    sub = p.add_subparsers(dest="cmd", required=True)

    pl = sub.add_parser("list", help="list methods and domains from the registries; `dalab list METHOD`: "
                                     "one method's hyperparameters")
    pl.add_argument("method", nargs="?", default=None,
                    help="print this method's hyperparameters (default, search space, meaning)")
    pl.add_argument("--all", action="store_true", help="include test-only domains")
    pl.add_argument("--markdown", action="store_true", help="print the methods table as Markdown (README)")
    pl.set_defaults(fn=cmd_list)

    pr = sub.add_parser("run", help="train and evaluate one method on one source->target pair")
    pr.add_argument("--method", required=True)
    side = pr.add_mutually_exclusive_group(required=True)
    side.add_argument("--source", help="the source domain")
    side.add_argument("--sources", metavar="A,B,...",
                      help="several source domains (multi-source adaptation, domain generalization): their order is "
                           "the domain index each sample carries; batches draw batch_size from each")
    pr.add_argument("--target", required=True)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--budget", default="0", help="target labels: 0 (unsupervised), k per class, or all")
    pr.add_argument("--steps", type=int, default=2000)
    pr.add_argument("--eval-every", type=int, default=250)
    pr.add_argument("--backbone", default="lenet")
    pr.add_argument("--setting", default=None, metavar="SETTING",
                    help="label-set setting: closed (default), partial, openset or universal, with the digits "
                         "split of `dalab list` (dalab.datasets.pairs.LABEL_SETS)")
    pr.add_argument("--classes", default=None, metavar="SHARED:SRC_PRIVATE:TGT_PRIVATE",
                    help="explicit label-set split, class indices and ranges, e.g. 0-4::5-9 (open-set: 0-4 known, "
                         "5-9 unknown in the target)")
    pr.add_argument("--pretrained", default=None, help="local ImageNet weight file (ResNets); never downloaded")
    pr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="hyperparameter override")
    pr.add_argument("--source-set", action="append", default=[], metavar="NAME=VALUE",
                    help="hyperparameter of the source_only run a method with init_from_source starts from")
    pr.add_argument("--runs-dir", default="results/runs")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--resume", action="store_true",
                    help="(always on) a rerun of a killed run continues from its checkpoint.pt")
    pr.add_argument("--force", action="store_true",
                    help="retrain a finished run (its result is kept as <run-id>.previous until the new one finishes)")
    pr.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16 autocast of forward passes; auto = bf16 on GPUs and CPUs that have it natively")
    add_run_options(pr)
    pr.add_argument("--download", action="store_true",
                    help="let torchvision download MNIST/USPS/SVHN into --data-root (needs internet)")
    pr.set_defaults(fn=cmd_run)

    ps = sub.add_parser("show-domains", help="write a PNG grid of train samples per domain (rows = classes)")
    ps.add_argument("domains", nargs="*", help="domains to draw (default: every offline domain)")
    ps.add_argument("--out", default="results/domains")
    ps.add_argument("--n", type=int, default=8, help="samples per class")
    ps.add_argument("--data-root", default=None, help="root folder of datasets read from disk")
    ps.set_defaults(fn=cmd_show_domains)

    pb = sub.add_parser("bench", help="run a benchmark grid from a YAML spec (resumable), then write its tables")
    pb.add_argument("spec", help="YAML spec, e.g. benchmarks/digits.yaml")
    pb.add_argument("--dry-run", action="store_true",
                    help="list the runs and their state, check data and weights, estimate the cost; train nothing")
    pb.add_argument("--probe-steps", type=int, default=3, metavar="N",
                    help="--dry-run: time N training steps of one run on this device for the estimate (0 = none)")
    pb.add_argument("--step-time", type=float, default=None, metavar="S",
                    help="--dry-run: estimate with S seconds per training step instead of a probe")
    pb.add_argument("--launcher", default="local", choices=["local", "submitit-local", "slurm"])
    pb.add_argument("--jobs", type=int, default=1,
                    help="parallel workers (local: processes, spread round-robin over the GPUs if any, "
                         "so --jobs 8 on one GPU runs 8 small-model runs concurrently on it)")
    pb.add_argument("--runs-dir", default=None, help="override the spec's runs_dir")
    pb.add_argument("--out", default=None, help="override the spec's table folder")
    add_run_options(pb, bench=True)
    pb.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the command named in table headers
    pb.set_defaults(fn=cmd_bench)

    _add_table_parser(sub)
    return p


def _add_table_parser(sub) -> None:
    """`dalab table`: its options (build_parser's longest part, kept apart so each reads on one screen)."""
    from dalab.selection import RULES
    pt = sub.add_parser("table", help="Markdown/LaTeX/CSV tables, significance and CD diagrams from run records",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="selection rules (--rules, --rule):\n"
                                    + "\n".join(f"  {r.name:<8} {r.text}" for r in RULES.values()))
    pt.add_argument("runs_dir", nargs="?", default="results/runs")
    pt.add_argument("--out", default=None, help="folder for table.md/.tex/.csv, runs.csv and figures "
                                                "(default results/tables; with --format only if given)")
    pt.add_argument("--rules", default=",".join(RULES), help="comma-separated selection rules: " + ", ".join(RULES))
    pt.add_argument("--methods", default=None, help="comma-separated methods (registry or display names)")
    pt.add_argument("--pairs", default=None, help="comma-separated pairs SOURCE:TARGET (default: all in the records)")
    pt.add_argument("--budgets", default=None, help="comma-separated label budgets, e.g. 0,10,all")
    pt.add_argument("--format", choices=["md", "tex", "csv"], default=None, help="print this format to stdout")
    pt.add_argument("--baseline", default="source_only", help="method that defines the delta column and the "
                                                              "significance marks (default source_only)")
    pt.add_argument("--explain", nargs=2, metavar=("METHOD", "PAIR"), default=None,
                    help="print the runs behind one cell (ids, seeds, chosen step, accuracy, command)")
    pt.add_argument("--rule", default="last", help="selection rule for --explain (default last)")
    pt.add_argument("--caption", default=None, help="replace each table's short caption ({rule} = the rule's name)")
    pt.add_argument("--label", default=None, help="LaTeX label prefix: tables get LABEL-<rule> "
                                                  "(default tab:<out folder>-<rule>)")
    pt.add_argument("--spec", default=None, help="a bench spec: its searches (trials:) are pooled into one row "
                                                 "each and its variants' names name rows; without it every "
                                                 "setting is its own row")
    pt.add_argument("--command", default=None, help=argparse.SUPPRESS)
    pt.set_defaults(fn=cmd_table)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("run", "bench"):  # signals only request a stop: the run checkpoints first
            from dalab.runs import graceful_stop
            with graceful_stop():
                return args.fn(args)
        return args.fn(args)
    except DalabError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours (before OSError: a subclass)
        sys.stderr.close()
        return 0
    except OSError as e:  # a full or read-only disk met outside the atomic writers: one line too
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        fix = ("choose a writable folder" if e.errno == errno.EROFS else
               "free some space there (or write to another disk)")
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}; {fix} and rerun the same command",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal (dalab.runs.Interrupted): checkpoint kept
        print(INTERRUPTED, file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
