#!/usr/bin/env bash
# The accelerator checks of the performance work, in one run (about 5 minutes on one GPU):
#   1. the E-step table (original port, yardstick, exact, mean-field; up to (65536, 8, 10));
#   2. the train-step table (small_cnn, preact_resnet18 at 32x32; classifier_only, prob_l2d;
#      fp32 and bf16);
#   3. real CIFAR-10H cells (python -m app) against their isolated step: samples/s and ratio,
#      the on-device loop (train.loop=auto) and the host-batch loop (train.loop=host);
#   4. several cells on one GPU: 4 cells in one process, then as 2 joblib processes.
# Usage, from the repository root (on a GPU image that ships JAX: ../shared/tools/gpu-image.md):
#   bash tests/benchmarks/device_check.sh [WHEELS_DIR] [CIFAR10H_SOURCE]
# WHEELS_DIR (default .whl): wheels of the packages the image lacks, installed into /tmp/site
# when grain or hydra is missing. CIFAR10H_SOURCE (default ../shared/data/cifar10h): the
# CIFAR-10 test batch and the CIFAR-10H label files. L2D_CHECK_QUICK=1: tiny settings, to try
# the script on a CPU. Each section has its own time limit; output goes to stdout.
set -uo pipefail
WHEELS=${1:-.whl}
SOURCE=${2:-../shared/data/cifar10h}
PY=${PYTHON:-python3}
WORK=${L2D_CHECK_DIR:-/tmp/l2d-device-check}
rm -rf "$WORK" && mkdir -p "$WORK"
if ! $PY -c "import grain, hydra" 2>/dev/null; then
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${L2D_CHECK_QUICK:-0}" = 1 ]; then
  ESTEP_ARGS=(--shapes 128,8,3 --repeats 3)
  STEP_ARGS=(--methods classifier_only --backbones small_cnn --sizes 16 --precisions fp32 --convs auto
             --seeds 1)
  DATA=(dataset.root=data/cifar10h_2k dataset.builder_args.limit=2000)
  EPOCHS=1; RESNET=small_cnn; RESNET_EPOCHS=1; RESNET_PRECISIONS=fp32,bf16; SEEDS=0,1
else
  ESTEP_ARGS=()
  STEP_ARGS=(--methods classifier_only,prob_l2d --backbones small_cnn,preact_resnet18 --sizes 32
             --precisions fp32,bf16 --convs auto --seeds 1)
  DATA=()
  EPOCHS=10; RESNET=preact_resnet18; RESNET_EPOCHS=3; RESNET_PRECISIONS=fp32,bf16; SEEDS=0,1,2,3
fi
CELL=($PY -m app -m experiment=single dataset=cifar10h "dataset.builder_args.source=$SOURCE" "${DATA[@]}"
      missing_rate=0.3 tracking=none "jax_cache_dir=$WORK/jax" "data_cache_dir=$WORK/data")

section() { echo; echo "== $1 (at most $2 s)"; SECONDS=0; }
done_in() { echo "(section took ${SECONDS} s)"; }

nvidia-smi -L 2>/dev/null
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

section "E-step: original port, yardstick, exact, mean-field" 50
timeout 50 $PY tests/benchmarks/estep_table.py "${ESTEP_ARGS[@]}"; done_in

section "train step (isolated, random data, batch 128)" 80
timeout 80 $PY tests/benchmarks/train_step_table.py "${STEP_ARGS[@]}"; done_in

section "real cells: small_cnn 32x32, $EPOCHS epochs, on-device loop and host loop" 140
timeout 110 "${CELL[@]}" method=classifier_only,prob_l2d train.loop=auto,host "train.epochs=$EPOCHS" \
  "output_dir=$WORK/cells" experiment_name=cells > "$WORK/cells.log" 2>&1 || tail -20 "$WORK/cells.log"
timeout 30 $PY tests/benchmarks/cell_throughput.py "$WORK/cells/runs/cells"; done_in

section "real cells: $RESNET 32x32, $RESNET_EPOCHS epochs, fp32 and bf16" 130
timeout 100 "${CELL[@]}" method=prob_l2d "dataset.backbone=$RESNET" "train.precision=$RESNET_PRECISIONS" \
  "train.epochs=$RESNET_EPOCHS" "output_dir=$WORK/resnet" experiment_name=resnet \
  > "$WORK/resnet.log" 2>&1 || tail -20 "$WORK/resnet.log"
timeout 30 $PY tests/benchmarks/cell_throughput.py "$WORK/resnet/runs/resnet"; done_in

section "several cells on one GPU: seeds $SEEDS of classifier_only, one process vs 2 processes" 80
for launcher in basic joblib; do
  start=$(date +%s%N)
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 40 "${CELL[@]}" \
    method=classifier_only "seed=$SEEDS" "train.epochs=$EPOCHS" "hydra/launcher=$launcher" \
    $([ $launcher = joblib ] && echo hydra.launcher.n_jobs=2) "output_dir=$WORK/many-$launcher" \
    experiment_name=many > "$WORK/many-$launcher.log" 2>&1 || tail -5 "$WORK/many-$launcher.log"
  echo "$launcher launcher: $(grep -c '^\[grid\].* ok:' "$WORK/many-$launcher.log") cells ok in" \
       "$(( ($(date +%s%N) - start) / 1000000 )) ms wall"
done; done_in
