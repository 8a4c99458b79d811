#!/usr/bin/env bash
# The checks that need a GPU, as one short run on a lent device machine (the `device` tool's `run`,
# from the repository root; about 2-4 minutes). What it runs:
#   1. the tests marked `cuda` in tests/test_cuda.py (torch CUDA recovery with AMP) and
#      tests/test_parity.py (onnxruntime CUDA parity; skipped with the reason without onnxruntime-gpu);
#   2. the CUDA latency table (scripts/bench_latency.py --provider cuda) where onnxruntime has a
#      CUDAExecutionProvider; otherwise one line saying why not (scripts/PERF.md, "CUDA").
# The lent machines' python3 holds PyTorch, onnx, onnxruntime (CPU), onnxscript and pytest, so gn-convert
# runs from the source tree. Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
out=${OUT:-/tmp/gn-device-checks}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py tests/test_parity.py 2>&1 \
    | tee "$out/cuda_tests.log"
status=${PIPESTATUS[0]}
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    python3 scripts/bench_latency.py --provider cuda --models resnet50,mobilenet_v3_large --rounds 20 \
        --json "$out/cuda_latency.json" 2>&1 | tee "$out/cuda_latency.log"
else
    echo "CUDA latency skipped: onnxruntime here has no CUDAExecutionProvider (carry onnxruntime-gpu: scripts/PERF.md, CUDA)" \
        | tee "$out/cuda_latency.log"
fi
exit "$status"
