#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA build of torch (and maybe no network):
#
#   1. tests/test_runtime_gpu.py: the runtime on Ray GPU workers over NCCL against one process;
#   2. examples/train_gpt.py --cluster auto on a Ray head started here with the machine's GPUs;
#   3. benchmarks/gpu_cost_model.py: GEMMs, attention and GPT blocks timed against the cost model.
#
# Usage: benchmarks/gpu_check.sh [WHEELHOUSE [OUTDIR]]
#   WHEELHOUSE (default .whl): wheels from benchmarks/offline_wheelhouse.py, installed into
#   /tmp/site first when the folder holds any; OUTDIR (default $OUT, else gpu-check): the logs,
#   nvidia-smi's report and gpu_cost_model.json. Each part has its own time limit (7.5 minutes
#   in all); the exit status is the number of parts that failed.
set -u
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
out=${2:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 100
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c 'import sys, torch, ray, pulp, highspy, numba, networkx
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "ray", ray.__version__, "numba", numba.__version__, "gpus", torch.cuda.device_count())' \
    2>&1 | tee "$out/versions.txt" || exit 101

failed=0
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_gpu.py \
    > "$out/pytest.log" 2>&1 || failed=$((failed + 1))
tail -n 25 "$out/pytest.log"

timeout 60 ray start --head --num-cpus=8 --include-dashboard=false --disable-usage-stats > "$out/ray_start.log" 2>&1
timeout 90 python3 examples/train_gpt.py --cluster auto --steps 10 \
    > "$out/train_gpt.log" 2>&1 || failed=$((failed + 1))
tail -n 12 "$out/train_gpt.log"
timeout 30 ray stop --force > /dev/null 2>&1

timeout 120 python3 benchmarks/gpu_cost_model.py --json "$out/gpu_cost_model.json" \
    2>&1 | tee "$out/gpu_cost_model.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
echo "gpu_check: $failed part(s) failed"
exit "$failed"
