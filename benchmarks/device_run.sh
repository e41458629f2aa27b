#!/usr/bin/env bash
# The GPU benchmark run behind the GPU figures in benchmarks/RESULTS.md, as one prepared
# script for a machine with JAX's CUDA build preinstalled. Packages missing there travel as
# wheels in .whl/ (pip download --no-deps, see the device notes): ml_collections for the
# benchmarks; numpyro 0.22 (the image had 0.21, below pyproject's minimum); for the tests
# part, anndata and its needs (array-api-compat legacy-api-wrap natsort scverse-misc
# session-info2 zarr numcodecs donfig google-crc32c).
#
#   bash benchmarks/device_run.sh OUTDIR [PART ...]
#
# PARTs, run in the order given (default: compare profile main). Times on one H100 or H200
# (16-core Xeon host; simulating the Replogle-scale screen takes about 50 s of each):
#   tests     the test modules that run on one GPU (pytest-xdist, 14 workers)              about 125 s
#   full_run  the whole 150,000-step Replogle-scale schedule, configs/replogle_scale.py   220 s
#   compare   compare_accelerators.py on cuda at batch 512 (training and evaluation)    about 250 s
#   profile   profile_step.py: the Replogle-scale step's kernels and its floor         about 80 s
#   main      the README's main command (20,000 steps of the default simulation)        about 35 s
#   chunks    Replogle-scale IWELBO (64 to 4,096 cells per chunk) and ATE chunks         about 120 s
# OUTDIR is also packed into $OUT/results.tgz after each part where OUT is set (the device
# tool returns at most 8 files), so a run stopped at its time limit keeps what it finished.
set -u
OUTDIR=${1:-benchmarks/out/device}
shift || true
PARTS=${*:-compare profile main}
# COMPARE_ARGS: extra compare_accelerators.py options, e.g. "--configs configs/simulation.py replogle_scale"
COMPARE_ARGS=${COMPARE_ARGS:-}
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
T0=$(date +%s)
pack() { if [ -n "${OUT:-}" ]; then tar -czf "$OUT/results.tgz" -C "$OUTDIR" .; fi; }
timed() {  # timed NAME SECONDS COMMAND...: run, log to OUTDIR/NAME.log, print the exit status and wall time
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local status=$?  # before any other command (a $(...) below would reset $?); 124: past the limit
  echo "[$(( $(date +%s) - T0 )) s] $name: exit $status in $(awk -v a="$start" -v b="$(date +%s.%N)" \
    'BEGIN{printf "%.1f", b-a}') s" | tee -a "$OUTDIR/$name.log" "$OUTDIR/parts.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, numpyro, orbax.checkpoint; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'numpyro', numpyro.__version__, jax.devices())"
  nproc; grep -m1 'model name' /proc/cpuinfo; } 2>&1 | tee "$OUTDIR/machine.txt"
pack

for part in $PARTS; do
  case $part in
    full_run)
      timed full_run 330 python3 -m sams_jax.train --config configs/replogle_scale.py --workdir /tmp/replogle_scale \
        --config.train.progress=False
      cp /tmp/replogle_scale/metrics.json "$OUTDIR/full_run_metrics.json" 2>/dev/null
      cp /tmp/replogle_scale/history.csv "$OUTDIR/full_run_history.csv" 2>/dev/null ;;
    tests)  # modules needing CPU devices (multidevice, distributed) or minutes (experiments, large_data) left out
      # -v names each failure as it happens (the summary is lost if the part hits its limit)
      XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda timed tests 200 python3 -m pytest -v -n 14 \
        -p no:cacheprovider -p no:benchmark --timeout 150 --tb=short -rfE tests/test_samplers.py tests/test_likelihoods.py \
        tests/test_objective.py tests/test_compute_dtype.py tests/test_baselines.py tests/test_basis.py \
        tests/test_metrics.py tests/test_prng.py tests/test_splits.py tests/test_train.py \
        tests/test_evaluate.py tests/test_anndata.py tests/test_simulation.py
      grep -E "FAILED|ERROR|passed|failed" "$OUTDIR/tests.log" | tail -25 ;;
    compare)
      # shellcheck disable=SC2086
      timed compare 330 python3 benchmarks/compare_accelerators.py --backends cuda --timeout 150 \
        --out "$OUTDIR/compare" $COMPARE_ARGS
      tail -12 "$OUTDIR/compare.log" ;;
    profile)
      timed profile 150 python3 benchmarks/profile_step.py --config replogle_scale --trace-dir /tmp/profile \
        --out "$OUTDIR/profile.json"
      tail -30 "$OUTDIR/profile.log" ;;
    main)
      timed main 90 python3 -m sams_jax.train --config configs/simulation.py --workdir /tmp/run_sim \
        --config.train.progress=False
      cp /tmp/run_sim/metrics.json "$OUTDIR/main_metrics.json" 2>/dev/null
      # elapsed_s per validation: how the command's time splits into steps and the rest
      cp /tmp/run_sim/history.csv "$OUTDIR/main_history.csv" 2>/dev/null ;;
    chunks)
      timed chunks 200 python3 benchmarks/ate_throughput.py --task replogle --repeats 2 \
        --iwelbo-chunk-sizes 64 256 1024 4096 --ate-chunks 8x256 8x1024 32x512 64x2500 --out "$OUTDIR/chunks.json"
      grep -A6 "_s_by_chunk" "$OUTDIR/chunks.log" ;;
    *) echo "unknown part $part (tests, full_run, compare, profile, main, chunks)" ;;
  esac
  pack
done
