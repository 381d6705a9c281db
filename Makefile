.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/mmai demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check mmai tests benchmarks
	.venv/bin/mypy mmai
