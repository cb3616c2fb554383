# The two entry points of the README. Both set up .venv first (idempotent, fast the second time).
.PHONY: demo test lint bench setup setup-dev

PROMPT ?= Explain in two sentences why small language models matter on edge devices.

demo: setup
	.venv/bin/edgellm generate --chat -p "$(PROMPT)" -n 96 --greedy

test: setup-dev
	.venv/bin/ruff check edgellm tests
	.venv/bin/python -m pytest -q

setup:
	scripts/setup.sh demo

setup-dev:
	scripts/setup.sh dev

lint: setup-dev
	.venv/bin/ruff check edgellm tests
