#!/usr/bin/env bash
# Fills .whl/ with the wheels benchmarks/gpu_check.py installs on a GPU machine that has no
# internet: what gca_pyg and its tests need beyond that machine's own PyTorch stack. Run it here,
# where PyPI is reachable; .whl/ is ignored by git and carried to the GPU machine.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   # the GPU machine's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
packages=(faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp "${platforms[@]}" -d .whl "${packages[@]}"
ls -1 .whl
