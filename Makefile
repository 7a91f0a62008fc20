# The README's two commands: `make demo` and `make test`.
# Both install missing system packages first (scripts/ensure-deps.sh).
#
# Tests, binaries and clippy share the dev profile (dependencies optimised),
# so RocksDB and librdkafka are compiled once.

CARGO ?= cargo

.PHONY: deps test test-tansu test-churn test-long-kill validate demo fmt lint ci

deps:
	@./scripts/ensure-deps.sh

## Run every test: unit, property (1,000 cases each), golden, purity, integration.
test: deps
	$(CARGO) test --all-targets

## The integration suite against tansu, a second real broker (installs it once).
test-tansu: deps
	./scripts/test-tansu.sh

## Three pods as processes: SIGKILL + empty replacement, scale 3 -> 1 -> 3
## (also part of `make test`).
test-churn: deps
	$(CARGO) test --test churn

## 100 SIGKILLs across three pods, about 75 s (a separate CI step).
test-long-kill: deps
	$(CARGO) test --test long_kill -- --ignored

## Static checks of deploy/ (Kubernetes schemas) and docker-compose.yml
## (compose schema); tests/deploy.rs and tests/ops.rs check them against the binary.
validate:
	./scripts/validate-manifests.sh

## Run the whole job locally on an embedded broker.
demo: deps
	$(CARGO) run -- demo

fmt:
	$(CARGO) fmt

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## What CI runs.
ci: lint validate test
