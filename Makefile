# tot-cakt: `make demo` runs the whole offline job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is installed first so that the CPU build is used where it is available locally;
# override (e.g. TORCH_SPEC="torch") to let pip pick a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install system-deps test demo bench bench-quick bench-quality clean

# espeak-ng synthesises the offline corpus; fortunes-zh provides its Chinese sentences.
system-deps:
	@if command -v espeak-ng >/dev/null && test -e /usr/share/games/fortunes/chinese >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng fortunes-zh; \
	else echo "Missing system packages: install espeak-ng and fortunes-zh (e.g. sudo apt-get install espeak-ng fortunes-zh)"; exit 1; fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: system-deps $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
