#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels that the GPU image lacks (it has torch, triton,
# transformers and accelerate) into .whl/ (ignored by git), for .ci/gpu to install there:
#   bash .ci/gpu_wheels.sh            # then carry .whl to the GPU machine with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  liger-kernel==0.8.5 submitit==1.5.4 trl==1.16.0 cut-cross-entropy==25.1.1
du -sh .whl && ls .whl
