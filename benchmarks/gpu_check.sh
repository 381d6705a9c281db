#!/usr/bin/env bash
# The device check (a CUDA machine with PyTorch but without mmai's imaging packages): installs the
# pure-Python wheels carried in .whl/ (monai, pydicom, nibabel), then runs the `gpu` tests, the GPU
# benchmark and `mmai demo` on CUDA. Logs and summary.json go to $OUT (default ./gpu_out).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
python3 benchmarks/gpu.py --repeats 10 2>&1 | tee "$OUT/bench_gpu.log" || status=1
if [ "${DEMO:-1}" = 1 ]; then  # DEMO=0 skips the end-to-end demo (about 3 minutes)
  timeout "${DEMO_TIMEOUT:-300}" python3 -c "from mmai.cli import main; main()" demo --out /tmp/mmai_demo_gpu -q \
    2>&1 | tee "$OUT/demo.log" || status=1
  cp /tmp/mmai_demo_gpu/summary.json "$OUT/demo_summary.json" 2>/dev/null
fi
exit $status
