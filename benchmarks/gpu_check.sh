#!/usr/bin/env bash
# One prepared pass over the CUDA paths, for a machine with an NVIDIA GPU (dependencies installed,
# run from the repository root). CI never has a GPU: this is what a session that borrows one runs.
#
#   OUT=runs/gpu bash benchmarks/gpu_check.sh [quick]
#
# 1. the CUDA tests: every op, rollout and scene on the GPU against the CPU (tests/cuda), and the
#    CUDA surface-scan test;
# 2. the benchmarks with --device cuda (marching cubes, FlexiCubes, G-Shell, the FlexiCubes scan,
#    MPM throughput), each under a time limit so one slow part cannot starve the rest.
# Logs and JUnit XML go to $OUT.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYVISTA_OFF_SCREEN=true
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-8}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "environment" | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, warp as wp; wp.config.quiet = True; wp.init(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('warp', wp.__version__, [str(d) for d in wp.get_devices()])"
} 2>&1 | tee -a "$OUT/env.txt"

stamp "CUDA tests (ops, rollouts)"
timeout 300 $PY -m pytest -q -p no:cacheprovider -n "$WORKERS" -k "not scene_on_device" \
  tests/cuda tests/geometry/test_kernels_flexicubes.py --junitxml="$OUT/cuda_ops.xml" -rfEs 2>&1 | tail -60

bench() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  stamp "benchmark $name"
  timeout "$limit" "$@" 2>&1 | grep -v "^Warp\|^Module" | tee -a "$OUT/bench.log"
}
bench marching_cubes 120 $PY benchmarks/marching_cubes.py --device cuda --sizes 64 128 256 --repeat 5
bench flexicubes 150 $PY benchmarks/flexicubes.py --device cuda --repeat 5
bench flexicubes_scan 60 $PY benchmarks/flexicubes_scan.py --device cuda --sizes 128 256 512
bench gshell 90 $PY benchmarks/gshell.py --device cuda --sizes 64 128 256
bench mpm 150 $PY benchmarks/mpm.py --device cuda --no-memory --sizes 10000 100000 1000000

if [ "${1:-}" != quick ]; then
  stamp "CUDA tests (every shipped scene, reduced, GPU vs CPU)"
  # Each scene runs on the CPU too (the reference): few workers, or the CPU halves crowd the cores.
  DIFFWORLD_CPU_THREADS=2 timeout 420 $PY -m pytest -q -p no:cacheprovider -n 4 -k "scene_on_device" -s \
    tests/cuda --junitxml="$OUT/cuda_scenes.xml" -rfE 2>&1 | grep -v "^$" | tail -40
fi
stamp "done"
