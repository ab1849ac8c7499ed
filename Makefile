# tot-cakt: `make demo` runs the whole offline job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is installed first so that the CPU build is used where it is available locally;
# override (e.g. TORCH_SPEC="torch") to let pip pick a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PRESET ?= quick
DEMO_DIR ?= outputs/demo
BENCH_DEVICE ?= cpu

# The versions `make install` takes: a lock of every package, resolved with uv from pyproject.toml's ranges and
# tested together (`make lock` refreshes it; `make test-latest` / `make test-oldest` try the ends of the ranges).
LOCK := requirements/lock.txt
UV_SPEC ?= uv==0.13.9

.PHONY: install system-deps kenlm lint test test-latest test-oldest drift-venv lock demo bench bench-quick bench-quality \
	bench-knowledge bench-knowledge-dose bench-knowledge-long bench-knowledge-deep bench-knowledge-lm mutation clean

# espeak-ng synthesises the offline corpus; fortunes-zh provides its Chinese sentences; manpages-zh and
# debian-reference-zh-cn are more text for the offline teacher.
SYSTEM_PACKAGES := espeak-ng fortunes-zh manpages-zh debian-reference-zh-cn
system-deps:
	@if command -v espeak-ng >/dev/null && test -e /usr/share/games/fortunes/chinese \
		&& test -d /usr/share/man/zh_CN && test -e /usr/share/debian-reference/debian-reference.zh-cn.txt.gz; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "Missing system packages: install $(SYSTEM_PACKAGES) (e.g. sudo apt-get install $(SYSTEM_PACKAGES))"; exit 1; fi

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -c $(LOCK) -e ".[dev,demo,lm,onnx]"
	$(PY) -m pip install --no-deps "pyctcdecode==0.5.0"  # see the lm extra in pyproject.toml
	touch $@

# Resolve the lock anew from pyproject.toml's ranges (newest releases; torch held at TORCH_SPEC, the build that
# `make install` takes), for CPython 3.11 on x86-64 Linux. Commit it after `make test` passes with it.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(UV_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra demo --extra lm --extra onnx -c $(VENV)/torch-constraint.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o $(LOCK)

# The newest releases pyproject.toml allows (test-latest) and its declared minimums (test-oldest), each in a venv
# of its own, through the tests of what a saved model meets: remote code, LM decoding, conformance, save/load.
# torch stays at TORCH_SPEC in both (older torch releases on PyPI are multi-GB CUDA builds); KenLM's estimator
# is the main venv's. Results: docs/TESTING.md.
DRIFT_TESTS := tests/test_remote_code.py tests/test_lm_decoding.py tests/test_conformance.py tests/test_saved_files.py \
	tests/test_public_api.py tests/test_processing.py
test-latest: install
	$(MAKE) drift-venv DRIFT_VENV=.venv-latest RESOLUTION=highest
test-oldest: install
	$(MAKE) drift-venv DRIFT_VENV=.venv-oldest RESOLUTION=lowest-direct
drift-venv:
	rm -rf $(DRIFT_VENV) && $(PYTHON) -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel "$(UV_SPEC)"
	echo "$(TORCH_SPEC)" > $(DRIFT_VENV)/torch-constraint.txt
	$(DRIFT_VENV)/bin/uv pip compile pyproject.toml --extra dev --extra demo --extra lm --extra onnx --resolution $(RESOLUTION) \
		-c $(DRIFT_VENV)/torch-constraint.txt --python-version 3.11 --no-header --quiet -o $(DRIFT_VENV)/resolved.txt
	$(DRIFT_VENV)/bin/python -m pip install --quiet -r $(DRIFT_VENV)/resolved.txt
	$(DRIFT_VENV)/bin/python -m pip install --quiet --no-deps -e . "pyctcdecode==0.5.0"
	$(DRIFT_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|datasets|accelerate|huggingface.hub|tokenizers|numpy|pyctcdecode|kenlm) "
	KENLM_BIN=$(CURDIR)/$(VENV)/bin $(DRIFT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(DRIFT_TESTS)

# KenLM's estimator (lmplz) and build_binary for the character language models: the kenlm sdist on PyPI holds
# their sources (the wheel only the query module); they build with CMake and Boost from Debian's packages in
# about 3 minutes on 2 cores and go to the venv's bin, where modeling_tot_cakt.training.language_model finds them.
KENLM_VERSION ?= 0.3.0
KENLM_BUILD_PACKAGES := cmake build-essential libboost-program-options-dev libboost-system-dev \
	libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev
KENLM_SRC := $(VENV)/kenlm-src
$(VENV)/bin/lmplz: | $(VENV)/.installed
	@if command -v cmake >/dev/null && test -e /usr/include/boost/program_options.hpp \
		&& test -e /usr/include/boost/thread.hpp && test -e /usr/include/zlib.h; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(KENLM_BUILD_PACKAGES); \
	else echo "Building KenLM's lmplz needs: $(KENLM_BUILD_PACKAGES)"; exit 1; fi
	rm -rf $(KENLM_SRC) && mkdir -p $(KENLM_SRC)
	$(PY) -m pip download --quiet --no-deps --no-binary kenlm --no-build-isolation -d $(KENLM_SRC) "kenlm==$(KENLM_VERSION)"
	tar xzf $(KENLM_SRC)/kenlm-$(KENLM_VERSION).tar.gz -C $(KENLM_SRC) --strip-components 1
	cmake -S $(KENLM_SRC) -B $(KENLM_SRC)/build -DCMAKE_BUILD_TYPE=Release >$(KENLM_SRC)/cmake.log
	cmake --build $(KENLM_SRC)/build --target lmplz build_binary -j 2 >$(KENLM_SRC)/build.log
	cp $(KENLM_SRC)/build/bin/lmplz $(KENLM_SRC)/build/bin/build_binary $(VENV)/bin/
	rm -rf $(KENLM_SRC)

kenlm: $(VENV)/bin/lmplz

install: system-deps $(VENV)/.installed $(VENV)/bin/lmplz

# Lint and format check first (ruff, configured in pyproject.toml), then the suite.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Plant known bugs one at a time and check that the tests catch each (docs/TESTING.md; 20-40 minutes
# on 2 cores). MUTATION_ARGS="--skip-slow" leaves out the mutants caught only by whole training runs.
MUTATION_ARGS ?=
mutation: install
	$(PY) tests/mutation/mutation_check.py $(MUTATION_ARGS)

# The quick preset finishes within DEMO_MINUTES (training stops when its share is spent); the others run their steps.
DEMO_MINUTES ?= 20
demo: install
	$(PY) -m modeling_tot_cakt.demo --preset $(PRESET) --work_dir $(DEMO_DIR) \
		$(if $(filter quick,$(PRESET)),--time_budget_minutes $(DEMO_MINUTES))

# Speed figures (under 30 minutes on 2 CPU cores); results go to docs/results/.
bench-quick: install
	$(PY) benchmarks/bench_solver.py --preset quick --device $(BENCH_DEVICE) --out docs/results/solver.json
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_solver_family.py --preset quick --device $(BENCH_DEVICE) \
		--out docs/results/solver_family.json
	$(PY) benchmarks/bench_training_cost.py --preset quick --device $(BENCH_DEVICE) --out docs/results/training_cost.json
	$(PY) benchmarks/bench_inference.py --preset quick --device $(BENCH_DEVICE) --out docs/results/inference.json

# The paper's comparison: CTC-only vs OT-CAKT vs TOT-CAKT, 5 paired seeds each (about 1.5 hours on 2 CPU cores).
bench-quality: install
	$(PY) benchmarks/bench_quality.py --preset quality --output docs/results/quality.json
	$(PY) benchmarks/bench_alignment.py --output docs/results/alignment.json

# The knowledge benchmark: eight methods x five seeds of 1,000-step fine-tunes, each decoded greedily and with the
# character LM (about 70 minutes on 2 cores once its corpus, teacher and pretrained encoder exist; those take 30 more).
bench-knowledge: install
	$(PY) benchmarks/bench_quality.py --preset knowledge --lm --output docs/results/knowledge.json \
		--plot docs/results/knowledge_curves.png

# The knowledge-dose decision: CTC-only (decoded greedily and with the LM, the control), today's TOT-CAKT, and the
# variants that raise the teacher's share of the encoder's gradient, each with a per-seed untrained teacher; five
# paired seeds, 45 fine-tunes of 1,000 steps: 74 minutes on 2 cores once the knowledge preset's corpus, teacher and
# encoder exist (about 30 more; docs/RESULTS.md, "Decided again at a dose that could say yes").
DOSE_METHODS = tot tot_untrained tot_dose tot_dose_untrained tot_masked tot_masked_untrained tot_kd tot_kd_untrained
bench-knowledge-dose: install
	$(PY) benchmarks/bench_quality.py --preset knowledge --label dose --lm --methods none \
		--output docs/results/knowledge_dose.json --plot docs/results/knowledge_dose_curves.png
	$(PY) benchmarks/bench_quality.py --preset knowledge --label dose --methods $(DOSE_METHODS) \
		--output docs/results/knowledge_dose.json --plot docs/results/knowledge_dose_curves.png
	$(PY) benchmarks/bench_quality.py --preset knowledge --label dose --report_only --methods none $(DOSE_METHODS) \
		--output docs/results/knowledge_dose.json --plot docs/results/knowledge_dose_curves.png

# The decision's two follow-ups (docs/RESULTS.md, "Decided again at a dose that could say yes"): CTC-only (greedy and
# with the LM) and the distillation with its untrained twin fine-tuned 3,000 steps, five paired seeds (15 runs); and
# the distillation from a deeper teacher (4 x 256, pretrained first) with its untrained twin, five seeds of 1,000 steps
# and of 3,000 steps (the 3,000-step part reuses bench-knowledge-long's CTC-only and 2 x 128 runs).
LONG := --preset knowledge --label dose3000 --max_steps 3000 --output docs/results/knowledge_dose_3000.json \
	--plot docs/results/knowledge_dose_3000_curves.png
bench-knowledge-long: install
	$(PY) benchmarks/bench_quality.py $(LONG) --lm --methods none
	$(PY) benchmarks/bench_quality.py $(LONG) --methods tot_kd tot_kd_untrained
	$(PY) benchmarks/bench_quality.py $(LONG) --report_only --methods none tot_kd tot_kd_untrained

DEEP := --preset knowledge --label dose --output docs/results/knowledge_deep_teacher.json \
	--plot docs/results/knowledge_deep_teacher_curves.png
DEEP_LONG := --preset knowledge --label dose3000 --max_steps 3000 --output docs/results/knowledge_deep_teacher_3000.json \
	--plot docs/results/knowledge_deep_teacher_3000_curves.png
KD_METHODS := none tot_kd tot_kd_untrained tot_kd_deep tot_kd_deep_untrained
bench-knowledge-deep: install
	$(PY) benchmarks/bench_quality.py $(DEEP) --methods tot_kd_deep tot_kd_deep_untrained
	$(PY) benchmarks/bench_quality.py $(DEEP) --report_only --methods $(KD_METHODS)
	$(PY) benchmarks/bench_quality.py $(DEEP_LONG) --methods tot_kd_deep tot_kd_deep_untrained
	$(PY) benchmarks/bench_quality.py $(DEEP_LONG) --report_only --methods $(KD_METHODS)

# Whether the distillation's gain survives the character LM (docs/RESULTS.md, "With the language model"): the
# 3,000-step CTC-only and distillation runs above decoded with the LM too, and the distillation at weights 0.1 and
# 0.03 (10 more runs, about 50 minutes on 2 cores); then the 1,000-step ones. Finished runs are reused.
KD_LM_METHODS := none tot_kd tot_kd_deep tot_kd_light tot_kd_faint
bench-knowledge-lm: install
	$(PY) benchmarks/bench_quality.py --preset knowledge --label dose3000 --max_steps 3000 --lm --methods $(KD_LM_METHODS) \
		--output docs/results/knowledge_kd_lm_3000.json --plot docs/results/knowledge_kd_lm_3000_curves.png
	$(PY) benchmarks/bench_quality.py --preset knowledge --label dose --lm --methods none tot_kd \
		--output docs/results/knowledge_kd_lm_1000.json --plot docs/results/knowledge_kd_lm_1000_curves.png

bench: bench-quick bench-quality

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .pytest_cache
