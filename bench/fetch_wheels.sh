#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_run.sh installs on a GPU machine that has torch,
# transformers and pyarrow but no deepspeed, accelerate or Ray: deepspeed (built here from its sdist
# as a pure-Python wheel), accelerate (the HF Trainer contender) and their small dependencies, for
# CPython 3.12 on x86_64 Linux (override with PYVER=3.11 etc.). About 6 MB. Versions follow .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
mkdir -p .whl
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  "$PIP" wheel -q --no-deps "deepspeed==$(ver deepspeed)" -w .whl
fi
pkgs=("accelerate==${ACCELERATE_VERSION:-1.15.0}")
for p in pydantic pydantic_core annotated_types typing_inspection typing_extensions hjson einops msgpack ninja psutil py-cpuinfo; do
  pkgs+=("$p==$(ver "$p")")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl "${pkgs[@]}"
ls -la .whl
