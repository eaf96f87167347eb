#!/usr/bin/env bash
# Creates .gptqmodel-venv: GPTQModel in its own environment, apart from the app's .venv (bench/gptqmodel_run.py runs
# there). GPTQModel 7.7.0 requires torch >= 2.14.1, whose only Linux wheel on PyPI is the CUDA build (555 MB plus the
# nvidia-* and cuda-toolkit wheels); on this CPU-only machine it runs over the app's CPU torch 2.13.0, so it is
# installed with --no-deps (built from its sdist without CUDA kernels: BUILD_CUDA_EXT=0) after the light dependencies
# it imports. Its default CPU worker pool refuses a 2-core machine unless GPTQMODEL_CPU_WORKERS is set
# (bench/gptqmodel_run.py sets it). Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/tool_env.sh
GPTQMODEL="gptqmodel==7.7.0"
TORCH="torch==2.13.0"          # the app's torch (requirements.txt); its +cpu build where pip finds it
DEPS=(transformers==5.23.0 "accelerate>=1.15.0" "safetensors>=0.8.0" threadpoolctl device-smi pypcre tokenicer logbar
      defuser datasets dill protobuf pillow requests jinja2 packaging numpy pyarrow setuptools wheel)
tool_env_begin "${AWQ_EXPLORER_GPTQMODEL_VENV:-.gptqmodel-venv}" \
  "$GPTQMODEL $TORCH $(cat "$0" bench/tool_env.sh | sha256sum | cut -c1-16)" "GPTQModel"
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH" "${DEPS[@]}"
BUILD_CUDA_EXT=0 "$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "$GPTQMODEL"
GPTQMODEL_CPU_WORKERS=2 "$VPY" -c "import gptqmodel" >/dev/null
tool_env_end
