#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call per stage:
#
#   python tools/pack_cache.py pack cache/utk128 .pack/utk128.zip     # here, once (53 MB)
#   bash benchmarks/gpu_session.sh default-graphs speed check default   # there; carry .pack
#   bash benchmarks/gpu_session.sh sweep                               # there, a second call
#
# check: the CUDA paths CI cannot run (tools/gpu_check.py: train, resume, DDP on NCCL, CUDA
#   graphs).
# speed: benchmarks/train_throughput.py, eager and with CUDA graphs (train.cuda_graphs).
# compile: the same with torch.compile, and with its CUDA graphs (mode reduce-overhead).
# default: configs/default.toml on the train split alone, timed on its own.
# default-graphs: the same with train.cuda_graphs=true.
# default-compiled: the same with train.compile=true train.compile_mode=reduce-overhead.
# sweep: sweeps/default_recipe.toml (recipe variants around the default), 8 runs at once
#   (SWEEP_ONLY="a b" SWEEP_PARALLEL=4 SWEEP_TIMEOUT=300 for fewer).
# study: the study's six tables and the seed spread at full length, 128 px (reports/reproduce.sh
#   runs them shortened on a CPU), and ours.toml but its rgb and 160 px runs (they prepare from
#   the JPEGs, which are not carried); SWEEP_PARALLEL runs at once; STUDY="optimizer ..." for
#   fewer.
# Results go to $OUT (default out/gpu): small JSON/CSV/Markdown files and one log per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
CACHE=cache/utk128
# BUDGET=seconds caps the whole session (a lent machine's call limit): each stage's timeout is
# its own cap or what is left, whichever is less, so the results of finished stages come back
END=$(($(date +%s) + ${BUDGET:-100000}))
cap() { local left=$((END - $(date +%s) - 10)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }

if [ ! -f $CACHE/images.npy ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
    $PY tools/pack_cache.py unpack .pack/utk128.zip $CACHE || exit 1
fi

# default_run NAME [key=value ...]: configs/default.toml, timed; metrics and history to $OUT
default_run() {
    local name=$1
    shift
    rm -rf /tmp/runs/$name-train  # a stage run again starts afresh (train never overwrites)
    timeout $(cap 200) $PY -m agegender train configs/default.toml data.cache=$CACHE \
        run.out=/tmp/runs/$name-train "$@"
    cp /tmp/runs/$name-train/metrics.json "$OUT/${name}_metrics.json"
    cp /tmp/runs/$name-train/history.csv "$OUT/${name}_history.csv"
    cp /tmp/runs/$name-train/curves.png "$OUT/${name}_curves.png"
}

for stage in "$@"; do
    t0=$(date +%s)
    echo "=== $stage"
    case $stage in
    check)
        timeout $(cap 150) $PY tools/gpu_check.py --cache $CACHE --json "$OUT/gpu_check.json" ;;
    speed)
        timeout $(cap 90) $PY benchmarks/train_throughput.py --models seed-cnn resnet-mt \
            --batch-sizes 32 128 512 --steps 30 --repeats 3 --count-ops \
            --json "$OUT/train_throughput.json"
        timeout $(cap 60) $PY benchmarks/train_throughput.py --models seed-cnn resnet-mt \
            --batch-sizes 32 64 128 512 --steps 30 --repeats 3 --cuda-graphs \
            --json "$OUT/train_throughput_cuda_graphs.json" ;;
    compile)
        timeout $(cap 120) $PY benchmarks/train_throughput.py --models resnet-mt --batch-sizes 512 \
            --steps 30 --repeats 3 --compile --json "$OUT/train_throughput_compile.json"
        timeout $(cap 150) $PY benchmarks/train_throughput.py --models resnet-mt \
            --batch-sizes 64 128 512 --steps 30 --repeats 3 --compile \
            --compile-mode reduce-overhead --json "$OUT/train_throughput_reduce_overhead.json" ;;
    default)
        default_run default ;;
    default-graphs)
        default_run default-graphs train.cuda_graphs=true ;;
    default-compiled)
        default_run default-compiled train.compile=true train.compile_mode=reduce-overhead ;;
    sweep)
        timeout $(cap ${SWEEP_TIMEOUT:-420}) $PY -m agegender sweep sweeps/default_recipe.toml \
            --data $CACHE --out /tmp/runs/sweep --parallel ${SWEEP_PARALLEL:-8} \
            ${SWEEP_ONLY:+--only $SWEEP_ONLY}
        (cd /tmp/runs && tar czf "$OUT/sweep.tgz" --exclude='*.safetensors' \
            --exclude='*.pt' --exclude='*.png' sweep) ;;
    study)
        for s in ${STUDY:-seeds optimizer learning_rate batch_size architecture regularization loss_weights ours}; do
            only=()
            [ $s = ours ] && only=(--only seed-cnn resnet-mt 64px 96px head-regression head-coral)
            timeout $(cap 600) $PY -m agegender sweep sweeps/$s.toml --data $CACHE \
                --out /tmp/runs/study/$s --parallel ${SWEEP_PARALLEL:-8} "${only[@]}"
        done
        (cd /tmp/runs && tar czf "$OUT/study.tgz" --exclude='*.safetensors' \
            --exclude='*.pt' --exclude='*.png' study) ;;
    *)
        echo "unknown stage $stage" >&2 ;;
    esac 2>&1 | tee "$OUT/$stage.log"
    echo "=== $stage took $(($(date +%s) - t0)) s"
done
