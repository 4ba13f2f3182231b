PYTHON := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install protos npm test test-integration demo demo-model bench bench-sessions soak clean

install: protos npm
	command -v redis-server >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)
# `ip netns` for the multi-host test (tests/test_multihost.py), from iproute2.
	command -v ip >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2)
# promtool (tests/test_observability_config.py) comes with Debian's prometheus package; its daemon is not wanted.
	command -v promtool >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
		&& { ! command -v systemctl >/dev/null || systemctl disable --now prometheus >/dev/null 2>&1 || true; })

$(PYTHON):
	python3 -m venv .venv

# torch first, so pip never resolves a CUDA build while installing the project.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,bench]"
	touch $@

protos: $(STAMP)
	$(PYTHON) scripts/gen_protos.py

# Pinned by the lockfiles: buf (tools/: `buf lint`, `buf breaking`) and the Node.js example's gRPC packages.
NPM_STAMPS := tools/node_modules/.installed examples/node/node_modules/.installed
npm: $(NPM_STAMPS)

%/node_modules/.installed: %/package-lock.json
	command -v npm >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm)
	npm ci --prefix $* --no-audit --no-fund
	touch $@

# The fast suite: unit tests, in-process parity and API checks (~3 minutes on 2 cores); `test-integration` runs the
# tests marked `integration` (real `moemesh up` clusters, service processes, redis-server, the chaos soak).
test: install
	$(PYTHON) -m pytest -q -m "not integration" --durations=10

test-integration: install
	$(PYTHON) -m pytest -q -m integration --durations=20

demo: install
	bash scripts/demo.sh

# Retrains the shipped demo bot (models/demo-bot/) on 2 CPU threads, about 20 minutes; prints its held-out score.
demo-model: install
	nice -n 5 $(PYTHON) -m moemesh.demo_bot.train --threads 2

bench: install
	$(PYTHON) -m bench.throughput $(BENCH_ARGS)

bench-sessions: install
	$(PYTHON) -m bench.sessions $(BENCH_ARGS)

clean:
	rm -rf moemesh/v1

# The chaos soak of the test suite for 30 minutes; its summary is appended to docs/reliability.md.
soak: install
	MOEMESH_CHAOS_S=1800 MOEMESH_CHAOS_REPORT=docs/reliability.md $(PYTHON) -m pytest -q -s -p no:cacheprovider tests/test_chaos.py
