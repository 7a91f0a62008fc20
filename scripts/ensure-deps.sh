#!/usr/bin/env bash
# Installs the system packages the build needs, if any are missing:
# libclang-dev for RocksDB's bindgen, a C/C++ toolchain, make, perl and
# zlib headers for the bundled librdkafka, Chromium for the live page
# test, Python with venv for the manifest checks and the tansu script, and
# a JRE and Maven for the Apache Kafka test broker (scripts/kafka.sh).
# Debian/Ubuntu only; elsewhere it
# says what is needed and leaves it to you.
set -euo pipefail

PACKAGES=(build-essential libclang-dev pkg-config zlib1g-dev perl python3 python3-venv chromium)
# A JRE and Maven from Debian's packages, unless the machine has them already.
command -v java >/dev/null 2>&1 || PACKAGES+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || PACKAGES+=(maven)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
else
  echo "ensure-deps: not a Debian system; make sure these are installed: ${PACKAGES[*]}" >&2
  exit 0
fi

[ ${#missing[@]} -eq 0 ] && exit 0

echo "ensure-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "ensure-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
