#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, most important first, each under its own
# timeout so that one failure leaves the others' numbers. Run from the repository root:
#
#   bash benchmarks/gpu_session.sh OUT_DIR
#
# 1. The paper's whole run through run.py: a VISPR-sized synthetic dataset (10,000 train, 4,167
#    validation, TEST_IMAGES test images at 256 px) generated and built, every split encoded once
#    into the feature cache by the frozen ResNet-50 (random weights), then 100 epochs of head
#    training from device-resident features with validation and a checkpoint every epoch.
# 2. feature_cache_benchmark, synthetic VISPR-sized features (10,000 x 14x14x1024 bf16): the
#    train step from the host loader and from device-resident features, then 100 real epochs.
# 3. train_step_benchmark in bf16: the image path, frozen and trainable encoder.
# 4. Issue 14's target: a VISPR-sized run (10,000 / 4,167 / VISPR_TEST test images) timed from
#    the already-built TFDS dataset to the written test evaluation, with VIEWS (default 4) cached
#    augmented views per training image held on the device, validation and a checkpoint every
#    epoch; run twice on fresh workdirs and caches, the second with a warm compilation cache.
# 5. The eval stream's decode rate (what the feature-cache build reads) on all the host's cores.
#
# PARTS="1 3" runs a subset; TRAIN_STEP_FLAGS adds flags to part 3 (e.g. --encoder_modes=trainable).
# Sizes shrink for a CPU dry run: NUM_TRAIN=64 NUM_VAL=16 TEST_IMAGES=16 EPOCHS=2 SMALL=1.
set -u
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
NUM_TRAIN=${NUM_TRAIN:-10000}
NUM_VAL=${NUM_VAL:-4167}
TEST_IMAGES=${TEST_IMAGES:-2000}
EPOCHS=${EPOCHS:-100}
WORK=${WORK:-/tmp/privattnet_gpu_session}
PARTS=${PARTS:-1 2 3 4 5}
part() { [[ " $PARTS " == *" $1 "* ]]; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/session.txt"; }

if [ -d .whl ] && ! python -c "import grain, tensorflow_datasets, ml_collections" 2> /dev/null; then
  # Wheels of what the lent machine lacks, downloaded beforehand (pip download).
  stamp "installing $(ls .whl | wc -l) wheels"
  python -m pip install -q --no-deps .whl/*.whl > "$OUT/pip.txt" 2>&1
fi
python - > "$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, jax
print("jax", jax.__version__, jax.devices())
for name in ("flax", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets", "ml_collections", "array_record",
             "tensorboardX", "PIL", "scipy", "msgpack"):
  try:
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "ok"))
  except Exception as error:  # pylint: disable=broad-except
    print(name, "MISSING", error)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/environment.txt" 2>&1
stamp "environment: $(head -1 "$OUT/environment.txt")"
SIZE_FLAGS=()
if [ -n "${SMALL:-}" ]; then
  SIZE_FLAGS=(--config.input.image_size=64 --config.input.batch_size=8 --config.model.encoder.depth=0)
fi

if part 1; then
stamp "1. the paper's run: ${NUM_TRAIN}/${NUM_VAL}/${TEST_IMAGES} images, ${EPOCHS} epochs"
rm -rf "$WORK"
time timeout 280 python run.py --config=configs/privattnet.py --workdir="$WORK/run" \
  --config.data.data_dir="$WORK/data" --config.data.synthetic.image_size=256 \
  --config.data.synthetic.num_train="$NUM_TRAIN" --config.data.synthetic.num_val="$NUM_VAL" \
  --config.data.synthetic.num_test="$TEST_IMAGES" --config.num_epochs="$EPOCHS" \
  --config.model.encoder.batchnorm=frozen --config.feature_cache.mode=device \
  --config.model.half_precision=True --config.log_every_steps=390 "${SIZE_FLAGS[@]}" > "$OUT/paper_run.txt" 2>&1
stamp "   exit $?"
grep -E "synthetic dataset|Building the feature|rows encoded|on the devices|Training privattnet|Trained|step 3900/|test \(checkpoint" \
  "$OUT/paper_run.txt" | cut -c1-400 | tee -a "$OUT/session.txt"
fi


if ! part 2; then
  :
elif [ -z "${SMALL:-}" ]; then
  stamp "2. feature cache benchmark"
  timeout 140 python -m benchmarks.feature_cache_benchmark --synthetic_features --batch_size=256 --dtype=bfloat16 \
    --num_images="$NUM_TRAIN" --steps=20 --full_run_epochs="$EPOCHS" > "$OUT/feature_cache.txt" 2>&1
  stamp "   exit $?"
else
  timeout 300 python -m benchmarks.feature_cache_benchmark --synthetic_features --image_size=64 --batch_size=8 \
    --num_images="$NUM_TRAIN" --steps=2 --windows=1 --full_run_epochs="$EPOCHS" > "$OUT/feature_cache.txt" 2>&1
  stamp "   exit $?"
fi

if [ -z "${SMALL:-}" ] && part 3; then
  stamp "3. train step benchmark, bf16"
  timeout 130 python -m benchmarks.train_step_benchmark --dtype=bfloat16 --batch_sizes=32,256 ${TRAIN_STEP_FLAGS:-} \
    > "$OUT/train_step_bf16.txt" 2>&1
  stamp "   exit $?"
fi
if part 4; then
VISPR_TEST=${VISPR_TEST:-8000}
VIEWS=${VIEWS:-4}
stamp "4. VISPR-sized run from the built dataset: ${NUM_TRAIN}/${NUM_VAL}/${VISPR_TEST}, K=${VIEWS} views"
rm -rf "$WORK/vispr_sized"
RUN4=(--config=configs/privattnet.py --config.data.data_dir="$WORK/vispr_sized/data"
  --config.data.synthetic.image_size=256 --config.data.synthetic.num_train="$NUM_TRAIN"
  --config.data.synthetic.num_val="$NUM_VAL" --config.data.synthetic.num_test="$VISPR_TEST"
  --config.num_epochs="$EPOCHS" --config.model.encoder.batchnorm=frozen --config.feature_cache.mode=device
  --config.feature_cache.train_views="$VIEWS" --config.model.half_precision=True
  --config.log_every_steps=390 --config.compilation_cache_dir="$WORK/vispr_sized/jax_cache" "${SIZE_FLAGS[@]}")
# The dataset alone (generated and built), outside the timed runs: --mode=evaluate fails after it.
timeout 200 python run.py --mode=evaluate --workdir="$WORK/vispr_sized/build" "${RUN4[@]}" \
  --config.feature_cache.mode=off > "$OUT/vispr_sized_build.txt" 2>&1
stamp "   dataset built (exit $?, an error is expected: no checkpoint)"
for attempt in cold warm; do
  start=$(date +%s.%N)
  timeout 280 python run.py --workdir="$WORK/vispr_sized/run_$attempt" "${RUN4[@]}" \
    --config.feature_cache.dir="$WORK/vispr_sized/feature_cache_$attempt" > "$OUT/vispr_sized_$attempt.txt" 2>&1
  status=$?
  stamp "   $attempt compilation cache: exit $status, $(python -c "import time; print(f'{time.time() - $start:.1f}')") s wall"
  grep -E "Building the feature|rows encoded|on the devices|Training privattnet|Trained|in checkpoint|test \(checkpoint" \
    "$OUT/vispr_sized_$attempt.txt" | cut -c1-400 | tee -a "$OUT/session.txt"
done
fi

if part 5; then
  stamp "5. eval-stream decode rate (the feature-cache build's input), all cores"
  timeout 120 python -m benchmarks.input_pipeline_benchmark --loader=eval --source=memory --batch_size=256 \
    --num_images=1024 --batches=16 --threads=1,4,$(nproc) > "$OUT/eval_decode.txt" 2>&1
  stamp "   exit $?"
  grep -E "threads=|transform alone" "$OUT/eval_decode.txt" | tee -a "$OUT/session.txt"
fi
stamp "done"
