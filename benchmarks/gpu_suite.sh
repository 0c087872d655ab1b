#!/usr/bin/env bash
# Every GPU-side check and timing of the model and its inner loop, in one call (a lent GPU's time is short):
# the test suite on the GPU host's torch (the CUDA tests run there), then the benchmarks on the device.
#   bash benchmarks/gpu_suite.sh [OUTDIR]
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
out="${1:-${OUT:-/tmp}}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -m pytest -q -p no:cacheprovider tests/ops tests/model 2>&1 | tee "$out/pytest.txt" | tail -8
# the Triton kernels: memory safety of one small case (the interpreter cannot show it), then kernel vs PyTorch forms
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider \
    tests/ops/test_triton_linear_memory.py -k "titans-defaults-packed" 2>&1 | tail -4 | tee "$out/sanitizer.txt"
fi
python3 -m benchmarks.kernels --device cuda --reps 5 2>&1 | tee "$out/kernels.txt"
python3 -m benchmarks.models --device cuda --reps 5 2>&1 | tee "$out/models_b4_t512.txt"
python3 -m benchmarks.models --device cuda --reps 5 --batch 16 --seq-len 2048 2>&1 | tee "$out/models_b16_t2048.txt"
python3 -m benchmarks.inner_loop --device cuda --reps 3 2>&1 | tee "$out/inner_loop.txt"
python3 -m benchmarks.mixer --device cuda --reps 5 2>&1 | tee "$out/mixer.txt"
python3 -m benchmarks.mixer --device cuda --reps 5 --compile 2>&1 | tee "$out/mixer_compiled.txt"
python3 -m benchmarks.models --device cuda --reps 5 --compile 2>&1 | tee "$out/models_compiled_b4_t512.txt"
