#!/usr/bin/env bash
# The accelerator checks of the performance work, in one prepared script, section by section
# (run in this order), each under its own time limit:
#   estep    (100 s) the E-step table at every shape: the original port, the yardstick, the
#            exact E-step + projection with the fixed and the early-exit loop (XLA), mean-field,
#            and the fused Pallas kernel (methods/fused_estep.py); min over interleaved calls;
#   ratios   (50 s) the E-step ratio benchmarks (pytest): speed-up over the original port and
#            the backend's default projection loop against the other loop;
#   cifar100 (130 s) paper scale: one epoch of experiment=paper_cifar100's training split
#            (PreAct-ResNet18, 32x32, batch 128) for classifier_only and prob_l2d, fp32 and
#            bf16, on synthetic images made on the device (tests/benchmarks/epoch_table.py),
#            and the GPU-hours of a full reproduction;
#   chaoyang (130 s) the same for the 224x224 ResNet18 preset (paper_chaoyang's sizes);
#   steps    (70 s) the train-step table (small_cnn, preact_resnet18 at 32x32;
#            classifier_only, prob_l2d; fp32 and bf16);
#   cells    (130 s) real CIFAR-10H cells (python -m app) against their isolated step:
#            samples/s and ratio, on-device loop (train.loop=auto) and host loop (train.loop=host);
#   resnet   (110 s) prob_l2d cells with preact_resnet18, fp32 and bf16;
#   many     (80 s) several cells on one GPU: 4 cells in one process, then 2 joblib processes.
# The limits add up to 13 minutes: where one command may run 10, run it as two calls,
# L2D_CHECK_SECTIONS=estep,ratios,cifar100,chaoyang then L2D_CHECK_SECTIONS=steps,cells,resnet,many.
# Usage, from the repository root (on a GPU image that ships JAX: ../shared/tools/gpu-image.md):
#   bash tests/benchmarks/device_check.sh [WHEELS_DIR] [CIFAR10H_SOURCE]
# WHEELS_DIR (default .whl): wheels of the packages the image lacks, installed into /tmp/site
# when grain or hydra is missing. CIFAR10H_SOURCE (default ../shared/data/cifar10h): the
# CIFAR-10 test batch and the CIFAR-10H label files. PYTHON (default python3): the
# interpreter. L2D_CHECK_SECTIONS (default: all, in the order above): a comma-separated list.
# L2D_CHECK_QUICK=1: tiny settings, to try the whole script on a CPU (PYTHON=.venv/bin/python
# there; about 5 minutes on 2 cores). Output goes to stdout.
set -uo pipefail
WHEELS=${1:-.whl}
SOURCE=${2:-../shared/data/cifar10h}
PY=${PYTHON:-python3}
WORK=${L2D_CHECK_DIR:-/tmp/l2d-device-check}
ALL_SECTIONS=estep,ratios,cifar100,chaoyang,steps,cells,resnet,many
SECTIONS=${L2D_CHECK_SECTIONS:-$ALL_SECTIONS}
for name in ${SECTIONS//,/ }; do  # refuse an unknown name before anything runs
  [[ ",$ALL_SECTIONS," == *",$name,"* ]] || {
    echo "unknown section '$name' in L2D_CHECK_SECTIONS (valid: $ALL_SECTIONS)"; exit 2; }
done
rm -rf "$WORK" && mkdir -p "$WORK"
if ! $PY -c "import grain, hydra" 2>/dev/null; then
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${L2D_CHECK_QUICK:-0}" = 1 ]; then
  ESTEP_ARGS=(--shapes 128,8,3 --repeats 3 --rounds 1
              --pipelines original,exact_fixed,exact_early_exit,fused)
  RATIO_K="projection_loop"
  STEP_ARGS=(--methods classifier_only --backbones small_cnn --sizes 16 --precisions fp32 --convs auto
             --seeds 1)
  DATA=(dataset.root=data/cifar10h_2k dataset.builder_args.limit=2000)
  EPOCHS=1; RESNET=small_cnn; RESNET_EPOCHS=1; RESNET_PRECISIONS=fp32,bf16; SEEDS=0,1
  PAPER_ARGS=(--quick --precisions fp32)
else
  ESTEP_ARGS=(--stat min --rounds 5 --repeats 100 --budget 0.3)
  RATIO_K="speedup_over_original or projection_loop"
  STEP_ARGS=(--methods classifier_only,prob_l2d --backbones small_cnn,preact_resnet18 --sizes 32
             --precisions fp32,bf16 --convs auto --seeds 1)
  DATA=()
  EPOCHS=10; RESNET=preact_resnet18; RESNET_EPOCHS=3; RESNET_PRECISIONS=fp32,bf16; SEEDS=0,1,2,3
  PAPER_ARGS=(--precisions fp32,bf16)
fi
CELL=($PY -m app -m experiment=single dataset=cifar10h "dataset.builder_args.source=$SOURCE" "${DATA[@]}"
      missing_rate=0.3 tracking=none "jax_cache_dir=$WORK/jax" "data_cache_dir=$WORK/data")

section() { echo; echo "== $1: $2 (at most $3 s)"; SECONDS=0; }
done_in() { echo "(section took ${SECONDS} s)"; }

nvidia-smi -L 2>/dev/null
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

estep() {
  section estep "E-step: original port, yardstick, exact (fixed / early exit), mean-field, fused kernel" 100
  timeout 100 $PY tests/benchmarks/estep_table.py "${ESTEP_ARGS[@]}"; done_in
}

ratios() {
  section ratios "E-step ratio benchmarks (pytest): speed-up over the original, default projection loop" 50
  timeout 50 $PY -m pytest -q -p no:cacheprovider tests/benchmarks/test_estep_benchmark.py --benchmark-enable \
    -k "$RATIO_K" --benchmark-json "$WORK/estep_ratios.json" > "$WORK/ratios.log" 2>&1
  grep -E "passed|failed|Error|assert" "$WORK/ratios.log" | tail -5
  $PY tests/benchmarks/benchmark_json.py "$WORK/estep_ratios.json"; done_in
}

paper() {  # $1: cifar100 or chaoyang
  section "$1" "paper scale: one epoch of paper_$1's training split, synthetic images" 130
  timeout 130 $PY tests/benchmarks/epoch_table.py --presets "paper_$1" "${PAPER_ARGS[@]}"; done_in
}
cifar100() { paper cifar100; }
chaoyang() { paper chaoyang; }

steps() {
  section steps "train step (isolated, random data, batch 128)" 70
  timeout 70 $PY tests/benchmarks/train_step_table.py "${STEP_ARGS[@]}"; done_in
}

cells() {
  section cells "real cells: small_cnn 32x32, $EPOCHS epochs, on-device loop and host loop" 130
  timeout 100 "${CELL[@]}" method=classifier_only,prob_l2d train.loop=auto,host "train.epochs=$EPOCHS" \
    "output_dir=$WORK/cells" experiment_name=cells > "$WORK/cells.log" 2>&1 || tail -20 "$WORK/cells.log"
  timeout 30 $PY tests/benchmarks/cell_throughput.py "$WORK/cells/runs/cells"; done_in
}

resnet() {
  section resnet "real cells: $RESNET 32x32, $RESNET_EPOCHS epochs, fp32 and bf16" 110
  timeout 80 "${CELL[@]}" method=prob_l2d "dataset.backbone=$RESNET" "train.precision=$RESNET_PRECISIONS" \
    "train.epochs=$RESNET_EPOCHS" "output_dir=$WORK/resnet" experiment_name=resnet \
    > "$WORK/resnet.log" 2>&1 || tail -20 "$WORK/resnet.log"
  timeout 30 $PY tests/benchmarks/cell_throughput.py "$WORK/resnet/runs/resnet"; done_in
}

many() {
  section many "several cells on one GPU: seeds $SEEDS of classifier_only, one process vs 2 processes" 80
  for launcher in basic joblib; do
    start=$(date +%s%N)
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 40 "${CELL[@]}" \
      method=classifier_only "seed=$SEEDS" "train.epochs=$EPOCHS" "hydra/launcher=$launcher" \
      $([ $launcher = joblib ] && echo hydra.launcher.n_jobs=2) "output_dir=$WORK/many-$launcher" \
      experiment_name=many > "$WORK/many-$launcher.log" 2>&1 || tail -5 "$WORK/many-$launcher.log"
    echo "$launcher launcher: $(grep -c '^\[grid\].* ok:' "$WORK/many-$launcher.log") cells ok in" \
         "$(( ($(date +%s%N) - start) / 1000000 )) ms wall"
  done; done_in
}

for name in ${SECTIONS//,/ }; do
  "$name"
done
