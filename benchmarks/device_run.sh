#!/usr/bin/env bash
# The GPU benchmark run behind the GPU figures in benchmarks/RESULTS.md, as one prepared
# script for a machine with JAX's CUDA build preinstalled. ml_collections (pure Python),
# if missing there, travels as a wheel in .whl/ (pip download ml_collections==1.1.0 -d .whl).
#
#   bash benchmarks/device_run.sh OUTDIR
set -u
OUTDIR=${1:-benchmarks/out/device}
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, numpyro, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'numpyro', numpyro.__version__, jax.devices())"
nproc; grep -m1 'model name' /proc/cpuinfo

# training at the paper's batch (512) and a large batch; evaluation at both scales
timeout 360 python3 benchmarks/compare_accelerators.py --backends cuda --batch-sizes 512 4096 --timeout 200 \
  --out "$OUTDIR/compare"

# the README's main command end to end (20,000 steps, validation, checkpoints, final IWELBO)
start=$(date +%s.%N)
timeout 120 python3 -m sams_jax.train --config configs/simulation.py --workdir /tmp/run_sim \
  --config.train.progress=False > "$OUTDIR/main_command.log" 2>&1
echo "main command exit $? in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s" | tee -a "$OUTDIR/main_command.log"
cp /tmp/run_sim/metrics.json "$OUTDIR/main_metrics.json" 2>/dev/null
tail -5 "$OUTDIR/main_command.log"
