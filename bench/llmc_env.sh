#!/usr/bin/env bash
# Creates .llmc-venv: llm-compressor in its own environment, apart from the app's .venv.
# llmcompressor pins transformers / compressed-tensors releases other than the app's (it brings transformers
# 5.17.0, the app runs 5.23.0), so it gets a virtualenv of its own; the app never imports it.
# torch is pinned to the app's release, installed the way install.sh installs it (pip takes the CPU build
# from local disk on the project's machines; an unpinned torch would pull the CUDA wheels, several GiB). Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/tool_env.sh
LLMC="llmcompressor==0.14.0.1"
TORCH="torch==2.13.0"          # the app's torch (requirements.txt); its +cpu build where pip finds it
tool_env_begin "${AWQ_EXPLORER_LLMC_VENV:-.llmc-venv}" "$LLMC $TORCH $(cat "$0" bench/tool_env.sh | sha256sum | cut -c1-16)" \
  "llm-compressor"
"$VPY" -m pip install -q --disable-pip-version-check "$LLMC" "$TORCH"
tool_env_end
