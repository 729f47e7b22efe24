# One command sets up and runs the main job; one sets up and runs the tests.
#   make bench   -> venv + install + the offline digits benchmark (writes results/)
#   make test    -> venv + install + ruff (lint) + pytest (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dalab-installed
RUNS ?= results/runs
MAIN_RUNS ?= results/digits/runs
JOBS ?= 2

.PHONY: setup test test-timing tables bench bench-long bench-partial bench-openset bench-universal bench-tta bench-tta-continual validators bench-multisource bench-single-sources bench-dg bench-dg-lodo multisource-tuning bench-hard bench-lenet bench-dann-vs-source bench-dann-vs-source-bn bsp-tuning pada-tuning protocol augment-bench budget-curve results-index speed clean-runs docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned exactly (the range in pyproject admits it, so pip keeps it)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet "setuptools>=77.0.3,<81"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m ruff check .
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The suite's measured time for the README (results/test_suite.json; run it on an otherwise idle machine)
test-timing: setup
	$(PY) -m ruff check .
	$(PY) -m dalab.benchmarks.suite_timing --out results/test_suite.json
	$(PY) -m dalab.benchmarks.methods_table --write

# The main job: every method x the 4 offline digits pairs x 3 seeds -> results/digits/ (resumable).
bench: setup
	$(VENV)/bin/dalab bench benchmarks/digits.yaml --jobs $(JOBS) --command "make bench"
	$(PY) -m dalab.benchmarks.tsne --runs-dir $(MAIN_RUNS) --out results/digits/tsne.png
	$(PY) -m dalab.results_index --out results/README.md
	$(PY) -m dalab.benchmarks.methods_table --write

# Every committed table regenerated from the run records committed beside it (no training; seconds)
tables: setup
	$(PY) -m dalab.rederive

# The benchmark grids: `make bench-NAME` runs benchmarks/digits_NAME.yaml (hyphens as underscores; resumable,
# records committed under the spec's runs_dir), then its report module if it has one (REPORT_bench-NAME).
#   bench-long            the still-moving methods at 4x the steps -> results/digits_long/ (+ agreement.md); its
#                         records are committed as they finish, so it can be completed over several sittings
#   bench-partial, bench-openset, bench-universal   the label-set settings (issue 24) -> results/<setting>/
#   bench-tta, bench-tta-continual   test-time adaptation (issue 26): each batch predicted before the method adapts
#                         on it -> results/tta/ (+ final.md: the final models beside the offline UDA methods)
#   bench-multisource     each digits domain the target of the other three: merged-sources baselines beside M3SDA
#                         and multi-source DANN -> results/multisource/ (+ single_source.md, with
#   bench-single-sources  source-only between every two digits domains)
#   bench-dg              domain generalization, leave-one-domain-out, no target data in any batch -> results/dg/
#   bench-dg-lodo         its leave-one-domain-out validation runs, for the lodo rule -> results/dg_lodo/
#   bench-hard            two pairs where the source model is near chance -> results/digits_hard/ (+ report.md)
#   bench-lenet           every method at its own defaults on the BN-free paper LeNet -> results/digits_lenet/
#   bench-dann-vs-source  source-only vs DANN on the BN-free paper LeNet at 2000 steps -> results/dann_vs_source/
#   bench-dann-vs-source-bn  the same on lenet_bn, both at their own defaults -> results/dann_vs_source_bn/
BENCH_TARGETS := bench-long bench-partial bench-openset bench-universal bench-tta bench-tta-continual \
	bench-multisource bench-single-sources bench-dg bench-dg-lodo bench-hard bench-lenet bench-dann-vs-source \
	bench-dann-vs-source-bn
REPORT_bench-long := long_report
REPORT_bench-tta := tta_report
REPORT_bench-multisource := multisource_report
REPORT_bench-single-sources := multisource_report
REPORT_bench-hard := hard_report

$(BENCH_TARGETS): bench-%: setup
	$(VENV)/bin/dalab bench benchmarks/digits_$(subst -,_,$*).yaml --jobs $(JOBS) --command "make bench-$*"
	$(if $(REPORT_$@),$(PY) -m dalab.benchmarks.$(REPORT_$@))

multisource-tuning: setup
	$(VENV)/bin/dalab bench benchmarks/multisource_tuning.yaml --jobs $(JOBS) --command "make multisource-tuning"

# Validator benchmark (issue 28): a checkpoint pool on the TUNING pairs (methods x random trials x every evaluation
# point) -> results/validators/ (tables per rule) and results/validators.md (each validator's weighted Spearman
# with target accuracy, the accuracy it picks and its gap to the oracle's, per pair and averaged; + figure)
validators: setup
	$(VENV)/bin/dalab bench benchmarks/validators.yaml --jobs $(JOBS) --command "make validators"
	$(PY) -m dalab.benchmarks.validators

# Issue-23 check: DANN with and without the BSP option on the tuning pairs -> results/bsp_tuning/
bsp-tuning: setup
	$(VENV)/bin/dalab bench benchmarks/bsp_tuning.yaml --jobs $(JOBS) --command "make bsp-tuning"

# Issue-24 defect hunt: PADA as in the partial table, at half the trade-off and with the authors' weighted
# mean, on the tuning pairs as partial tasks -> results/pada_tuning/
pada-tuning: setup
	$(VENV)/bin/dalab bench benchmarks/pada_tuning.yaml --jobs $(JOBS) --command "make pada-tuning"

# Issue-13 study: defaults and budget chosen on the tuning pairs (digits-extra) -> results/protocol.md (+ .png).
# 1260 runs (hours on 2 CPU cores): the missing ones are trained in $(JOBS) workers, resumably, into
# results/protocol/runs, whose records are committed as they finish; then the report is written from them
# (`make tables` re-derives it from the records alone).
protocol: setup
	$(PY) -m dalab.benchmarks.protocol --runs-dir results/protocol/runs --main-runs-dir $(MAIN_RUNS) \
		--jobs $(JOBS) --out results/protocol.md
	$(PY) -m dalab.results_index --out results/README.md

# Issue-8 check: source-only and DANN with/without each data option, mnist5k -> ucidigits, 3 seeds
augment-bench: setup
	$(VENV)/bin/dalab bench benchmarks/augment.yaml --jobs $(JOBS) --command "make augment-bench"

# Label-budget curve: target accuracy vs labels per class (0, 1, 5, 10, all), one pair, 300 steps, 3 seeds
budget-curve: setup
	$(VENV)/bin/dalab bench benchmarks/label_budget.yaml --jobs $(JOBS) --command "make budget-curve"
	$(PY) -m dalab.results_index --out results/README.md

# docs/spec.md: every key of a benchmark spec, its type, default and meaning, from dalab.bench.BenchSpec
docs: setup
	$(PY) -m dalab.benchmarks.spec_reference --write

# results/README.md: every table and figure under results/, what it shows, the command that regenerates it
results-index: setup
	$(PY) -m dalab.results_index --out results/README.md

# Throughput: bare loop vs dalab trainer vs pytorch-adapt adapter (prints a table)
speed: setup
	$(PY) -m dalab.benchmarks.speed --out results/speed.md

clean-runs:
	rm -rf $(RUNS)
