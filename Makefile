# The README's two commands: `make demo` and `make test`.
# Both install missing system packages first (scripts/ensure-deps.sh).
#
# Both build the same thing: `cargo test --workspace --all-targets`, whose
# feature set includes the dev-dependencies'. `make demo` builds that with
# `--no-run` and starts the binary it made, so whichever of the two runs
# first, the second compiles neither RocksDB nor librdkafka again. (A plain
# `cargo run` resolves features without the dev-dependencies, and one of
# them changes a build-time dependency of librocksdb-sys: it would rebuild
# RocksDB.)

CARGO ?= cargo
# Where cargo puts the binary (CI sets CARGO_TARGET_DIR to a cache).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
BUILD := $(CARGO) test --workspace --all-targets --no-run

.PHONY: deps test test-tansu test-kafka test-churn test-long-kill test-soak fuzz validate demo fmt lint ci

deps:
	@./scripts/ensure-deps.sh

## Run every test of every crate: unit, property (1,000 cases each), golden,
## purity, integration, bench smoke.
test: deps
	$(CARGO) test --workspace --all-targets

## The integration suite against tansu, a second real broker (installs it once).
test-tansu: deps
	./scripts/test-tansu.sh

## The integration suite and the kill tests against Apache Kafka 4.4, one
## KRaft node from Maven Central's jars (fetched once; needs a JRE and Maven).
test-kafka: deps
	./scripts/test-kafka.sh

## Three pods as processes: SIGKILL + empty replacement, scale 3 -> 1 -> 3
## (also part of `make test`).
test-churn: deps
	$(CARGO) test --test churn

## 100 SIGKILLs across three pods, about 75 s (a separate CI step).
test-long-kill: deps
	$(CARGO) test --test long_kill -- --ignored

## The order parser and the HTTP router fuzzed for a minute each
## (5 s each inside `make test`; TALLY_FUZZ_SEED=<n> replays a run).
fuzz: deps
	TALLY_FUZZ_SECONDS=60 $(CARGO) test --test fuzz -- --nocapture

## Every fault at once (SIGKILLs, brokers down, error bursts, rebalances
## during slow flushes) across three pods, about three minutes
## (TALLY_SOAK_SEED=<n> replays a run; BENCHMARKS.md lists the runs).
test-soak: deps
	$(CARGO) test --test soak -- --ignored --nocapture

## Static checks of deploy/ (Kubernetes schemas) and docker-compose.yml
## (compose schema); tests/deploy.rs and tests/ops.rs check them against the binary.
validate:
	./scripts/validate-manifests.sh

## Run the whole job locally on an embedded broker.
demo: deps
	$(BUILD)
	$(TARGET_DIR)/debug/tally demo

fmt:
	$(CARGO) fmt

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## What CI runs.
ci: lint validate test
