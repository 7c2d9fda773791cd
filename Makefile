# The two commands: `make demo` (synthetic corpus -> train -> embed -> index -> search) and `make test`.
# Both create or reuse .venv. On machines without an NVIDIA GPU torch is pinned to the CPU build first,
# so pip does not pull a multi-GB CUDA wheel.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: setup browser demo test lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VENV)/bin/pip install -q -e '.[gpu,nvdec,dev]'; \
	else \
		$(VENV)/bin/pip install -q $(TORCH_CPU) && $(VENV)/bin/pip install -q -e '.[cpu,dev]'; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avindex demo

# The browser test (tests/test_browser.py) drives Debian's chromium through chromium-driver: install
# them when missing and apt-get can (as root); elsewhere that one test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -q && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -q chromium chromium-driver) \
				|| echo "chromium could not be installed: the browser test will skip"; \
		else \
			echo "no chromium and no root apt-get: the browser test will skip"; \
		fi; \
	fi

test: $(STAMP) browser
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/avindex bench --json bench-out/results.json --plot bench-out/results.png

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf avindex-demo bench-out .pytest_cache .ruff_cache
