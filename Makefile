# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit gen check-gen bench fuzz soak hostile clean guest-image guest-test

# Editable installs in setuptools' compat mode: a plain path in a .pth file (this checkout and tools/ on sys.path),
# not the default import-hook finder, which costs every Python process of the venv ~10 ms of imports at start.
# setuptools calls compat mode transitional: should a release drop it, the default mode is used instead.
$(STAMP): pyproject.toml tools/pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[dev]' -e ./tools \
		|| $(PY) -m pip install --quiet -e '.[dev]' -e ./tools  # the guest package and the tools distribution
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) check-gen lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	bash tests/setup-host.sh
	$(PY) -m pytest $(PYTEST_ARGS)

gen: $(STAMP)
	$(PY) scripts/gen_protos.py

check-gen: $(STAMP)
	$(PY) scripts/gen_protos.py --check

# The Kata extension image (rootfs/build_guest_image.py): make guest-image OUT=DIR [CACHE=DIR]
guest-image:
	@test -n "$(OUT)" || { echo "usage: make guest-image OUT=DIR" >&2; exit 2; }
	bash rootfs/setup-build-host.sh
	$(PYTHON) rootfs/build_guest_image.py --out "$(OUT)" $(if $(CACHE),--cache "$(CACHE)")

# The slow guest tests (image build + kata launch, nspawn boot), filling their download cache on the way; after this
# `make test` runs them too. Needs root, loop devices and network for the first run.
guest-test: $(STAMP)
	bash rootfs/setup-build-host.sh --boot
	CI=true $(PY) -m pytest -m "guestimage or boot" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

# 100 000 fuzz examples over every RPC on gRPC, ttRPC and REST and the parsers; prints the count
fuzz: $(STAMP)
	FUZZ_SCALE=20 $(PY) -m pytest -q -o timeout=7200 tests/reliability/test_fuzz.py

# 50 concurrent clients x 60 s of mixed calls on both transports against a daemon; prints RSS and fd figures
soak: $(STAMP)
	SOAK_SECONDS=60 $(PY) -m pytest -q -s -o timeout=1200 tests/reliability/test_soak.py

# hostile local clients against the daemon and api-server-rest, a legitimate caller served within the strict 2 s
hostile: $(STAMP)
	HOSTILE_LEGIT_S=2 $(PY) -m pytest -q -s -o timeout=1200 tests/reliability/test_hostile_clients.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
