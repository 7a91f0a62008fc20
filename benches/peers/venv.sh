# Sourced by benches/peers/run.sh and benches/throughput.sh: the Quix
# Streams peer's venv, made once and cached in $TOOLS (scripts/tansu.sh).
#   quix_install   sets QUIX_PYTHON (installs quixstreams 3.28.1 if missing)
quix_install() {
  local venv="$TOOLS/quix-venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import quixstreams' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "quixstreams==3.28.1"
  fi
  QUIX_PYTHON="$venv/bin/python"
}
