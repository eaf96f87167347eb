#!/usr/bin/env bash
# Creates .llmc-venv: llm-compressor in its own environment, apart from the app's .venv.
# llmcompressor pins transformers / compressed-tensors releases other than the app's (it brings transformers
# 5.17.0, the app runs 5.23.0), so it gets a virtualenv of its own; the app never imports it.
# torch is pinned to the app's release, installed the way install.sh installs it (pip takes the CPU build
# from local disk on the project's machines; an unpinned torch would pull the CUDA wheels, several GiB). Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${AWQ_EXPLORER_LLMC_VENV:-.llmc-venv}"
LLMC="llmcompressor==0.14.0.1"
TORCH="torch==2.13.0"          # the app's torch (requirements.txt); its +cpu build where pip finds it
want="$LLMC $TORCH $(sha256sum "$0" | cut -c1-16)"
stamp="$VENV/.llmc-installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "llm-compressor environment ready in $VENV" >&2; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
start=$(date +%s)
"$VPY" -m pip install -q --disable-pip-version-check "$LLMC" "$TORCH"
echo "$want" > "$stamp"
echo "llm-compressor installed in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))" >&2
