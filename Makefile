# The two entry points of the README. Both set up .venv first (idempotent, fast the second time).
.PHONY: demo test lint bench bench-ablation bench-pruned pareto setup setup-dev

PROMPT ?= Explain in two sentences why small language models matter on edge devices.

# The whole product on the default model: compress (recipe models/recipes/$(RECIPE).toml) -> export to
# ONNX -> streaming chat on ONNX Runtime. RECIPE=rtn-int4 (or any recipe) swaps the compression step;
# e.g. make demo RECIPE=allocate-size COMPRESS_ARGS="--budget-mb 84" (measures sensitivity once, minutes).
RECIPE ?= lossless
COMPRESS_ARGS ?=
demo: setup
	.venv/bin/edgellm compress --recipe $(RECIPE) $(COMPRESS_ARGS) -o .cache/demo-compressed --force
	.venv/bin/edgellm export onnx .cache/demo-compressed -o .cache/demo-onnx --force
	.venv/bin/edgellm generate .cache/demo-onnx --chat -p "$(PROMPT)" -n 96 --greedy

test: setup-dev
	.venv/bin/ruff check edgellm tests
	.venv/bin/python -m pytest -q

setup:
	scripts/setup.sh demo

setup-dev:
	scripts/setup.sh dev

lint: setup-dev
	.venv/bin/ruff check edgellm tests

# Side-by-side benchmark against llama.cpp (not part of the tests): default lossless export, 2 threads.
bench: setup-dev
	mkdir -p bench_results
	.venv/bin/edgellm bench --vs llama.cpp --threads 2 --rounds 5 --lookup 4 --genai --json bench_results/ort_vs_llamacpp.json
	.venv/bin/edgellm bench --vs llama.cpp --threads 2 --rounds 3 --plan lossless-exact --json bench_results/ort_exact_vs_llamacpp.json

# Where decode time goes: the lossless export vs the same graph without the Q4_1 offset correction (a timing
# ablation, wrong weights) vs llama.cpp, one interleaved run, plus an ONNX Runtime profile by op type.
bench-ablation: setup-dev
	mkdir -p bench_results
	.venv/bin/python -m edgellm.bench.offset_ablation --rounds 5 --json bench_results/offset_ablation.json

# Structured pruning (20 %) + KD + int4 against the dense lossless export and llama.cpp, one interleaved run.
bench-pruned: setup-dev
	mkdir -p bench_results .cache
	.venv/bin/edgellm compress --recipe structured-20-kd-int4 -o .cache/s20 --force
	.venv/bin/edgellm export onnx .cache/s20 -o .cache/s20-onnx --force
	.venv/bin/edgellm export onnx -o .cache/dense-onnx --force
	.venv/bin/edgellm bench .cache/s20-onnx --also .cache/dense-onnx --vs llama.cpp --threads 2 --rounds 5 \
		--json bench_results/structured20_kd_int4_vs_dense.json

# Issue 4's quality/size/speed table and plot (rows cached under ~/.cache/edgellm/pareto; hours from scratch).
pareto: setup-dev
	.venv/bin/python -m edgellm.bench.pareto --out bench_results/pareto
