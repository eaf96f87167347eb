#!/usr/bin/env bash
# Builds llama.cpp from the llama-cpp-python 0.3.36 source distribution on PyPI (it vendors the full llama.cpp
# source): the tools llama-quantize, llama-perplexity and llama-imatrix into .llamacpp/build/bin, and the Python
# bindings (llama_cpp) into the project virtualenv. Idempotent; about 10 minutes on 2 cores the first time.
# CPU flags: GGML_NATIVE is off because these machines advertise AMX, and an AMX tile instruction kills the process
# (SIGILL); AVX-512 is turned on only when this CPU has it.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY="${AWQ_EXPLORER_VENV:-.venv}/bin/python"
VER=0.3.36
DIR=.llamacpp
mkdir -p "$DIR"
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "error: llama.cpp needs cmake and g++; as root: apt-get install cmake g++" >&2; exit 1
  fi
fi
avx512=OFF; grep -q avx512f /proc/cpuinfo && avx512=ON
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$avx512"
stamp="$DIR/.built-$VER-avx512-$avx512"
[ -f "$stamp" ] && "$VPY" -c 'import llama_cpp' 2>/dev/null && exit 0
sdist="$DIR/sdist/llama_cpp_python-$VER.tar.gz"
[ -f "$sdist" ] || "$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$VER" -d "$DIR/sdist"
if [ ! -d "$DIR/src/vendor/llama.cpp" ]; then
  rm -rf "$DIR/src" "$DIR/src.tmp" && mkdir -p "$DIR/src.tmp"
  tar -xzf "$sdist" -C "$DIR/src.tmp" --strip-components=1 && mv "$DIR/src.tmp" "$DIR/src"
fi
jobs=$(nproc)
echo "llama.cpp: building llama-quantize, llama-perplexity, llama-imatrix ($FLAGS)" >&2
log="$DIR/build.log"
fail() { tail -n 30 "$log" >&2; echo "error: $1 (full log: $log)" >&2; exit 1; }
cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF $FLAGS \
  >"$log" 2>&1 || fail "configuring llama.cpp failed"
cmake --build "$DIR/build" -j "$jobs" --target llama-quantize llama-perplexity llama-imatrix >>"$log" 2>&1 \
  || fail "building llama.cpp's tools failed"
echo "llama.cpp: building the Python bindings llama-cpp-python==$VER" >&2
CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$VPY" -m pip install -q --disable-pip-version-check \
  "$sdist" >>"$log" 2>&1 || fail "building the llama-cpp-python bindings failed"
"$VPY" -c 'import llama_cpp' >>"$log" 2>&1 || fail "the llama_cpp bindings do not import"
touch "$stamp"
