#!/usr/bin/env bash
# The GPU benchmark, as one script for a single-GPU machine without Ray (the H200 box has torch,
# transformers and pyarrow). Run from anywhere; writes JSON + logs to $OUT (default bench/out/gpu).
#
#   bash bench/gpu_run.sh          # quick: the goals, BERT-base and GPT-2 124M, ftdist vs plain vs HF (<= 6 min)
#   bash bench/gpu_run.sh compile  # torch.compile for all three; BERT-base ZeRO stages and DeepSpeed bf16 (<= 9 min)
#   bash bench/gpu_run.sh levers   # GPT-2 ZeRO stages, activation checkpointing, eager attention, accumulation (<= 10 min)
#   bash bench/gpu_run.sh memory   # issue 13: bench.memory on GPT-2-medium (355M), bf16, 1 GPU: ZeRO stages, offload, LoRA (<= 8 min)
#   bash bench/gpu_run.sh full     # all parts (longer than one 10-minute device command: run parts separately)
#   DEVICE=cpu bash bench/gpu_run.sh   # rehearsal on a CPU machine: same script, batch 2 x 64, 2 steps
#
# deepspeed, accelerate and their small pure-Python/cp312 dependencies travel as wheels in .whl/
# (filled by bench/fetch_wheels.sh, carried with the tree); only the ones missing or older here are
# installed, into $SITE, never into the system site-packages. Each run has its own timeout, so one
# failure or hang leaves the others' JSON in place.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
case "$MODE" in quick|compile|levers|memory|full) ;; *) echo "usage: $0 [quick|compile|levers|memory|full]"; exit 2 ;; esac
OUT=${OUT:-bench/out/gpu}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
SHRINK=()
[ "$DEVICE" = cuda ] || SHRINK=(--batch 2 --seq 64 --steps 2 --rounds 1 --warmup 1 --round-warmup 1)
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) gpu_run.sh $MODE on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if ls .whl/*.whl >/dev/null 2>&1; then
  need=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, re
from packaging.version import Version
for w in sorted(glob.glob(".whl/*.whl")):
    name, ver = w.split("/")[-1].split("-")[:2]
    try:
        have = md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(ver):
        print(w)
EOF
)
  if [ -n "$need" ]; then
    echo "installing into $SITE: $need"
    "$PY" -m pip install -q --upgrade --no-index --no-deps --target "$SITE" $need || exit 1
  fi
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

DEVICE=$DEVICE "$PY" - <<'EOF' || exit 1
import os, sys, torch
import deepspeed, accelerate, transformers, ftdist.loop, bench.throughput  # noqa: F401
assert "ray" not in sys.modules, "ray was imported"
assert os.environ["DEVICE"] != "cuda" or torch.cuda.is_available(), "no CUDA device"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "accelerate", accelerate.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF

run() {  # run NAME TIMEOUT_S ARGS...
  local name=$1 t=$2; shift 2
  echo "== $name: python -m bench.throughput $*"
  timeout "$t" "$PY" -m bench.throughput --device "$DEVICE" --out "$OUT/$name.json" "$@" "${SHRINK[@]}" 2>"$OUT/$name.err"
  local rc=$?
  [ $rc -eq 0 ] || { echo "!! $name failed (exit $rc):"; tail -20 "$OUT/$name.err"; }
}

part() { [ "$MODE" = full ] || [ "$MODE" = "$1" ]; }

if part quick; then
  # The goals: ftdist >= 1.0x the plain bf16 loop and >= 1.5x the HF Trainer on both models.
  run bert-base 150 --model bert-base --contenders ftdist plain hf --rounds 3 --steps 30 --warmup 5 --round-warmup 2
  run gpt2-124m 180 --model gpt2-124m --contenders ftdist plain hf --rounds 3 --steps 15 --warmup 5 --round-warmup 2
fi
if part compile; then
  # GPT-2 >= 400k tokens/s needs torch.compile; every contender compiled, HF included.
  run gpt2-124m-compile 300 --model gpt2-124m --compile --contenders ftdist plain hf --rounds 3 --steps 15 --warmup 5 --round-warmup 3
  # DeepSpeed settings per ZeRO stage, and its own bf16 optimizer vs torch_autocast (ftdist's default).
  run bert-base-zero 200 --model bert-base --rounds 3 --steps 20 --warmup 5 --contenders ftdist \
    ftdist@deepspeed.zero_stage=1 ftdist@deepspeed.zero_stage=2 ftdist@deepspeed.zero_stage=2@deepspeed.overlap_comm=false \
    ftdist@deepspeed.zero_stage=3 ftdist@deepspeed.mixed_precision=deepspeed ftdist@bench.ws1_allreduce=true \
    ftdist@bench.torch_clip=true plain
fi
if part levers; then
  run gpt2-124m-zero 220 --model gpt2-124m --rounds 3 --steps 10 --warmup 4 --contenders ftdist \
    ftdist@deepspeed.zero_stage=1 ftdist@deepspeed.zero_stage=2 ftdist@deepspeed.zero_stage=3 \
    ftdist@deepspeed.mixed_precision=deepspeed ftdist@bench.torch_clip=true plain
  # Activation checkpointing (memory for compute), eager attention vs SDPA, gradient accumulation.
  run gpt2-124m-ckpt 120 --model gpt2-124m --grad-ckpt --contenders ftdist plain --rounds 2 --steps 10 --warmup 3
  run gpt2-124m-eager 120 --model gpt2-124m --attn eager --contenders ftdist plain --rounds 2 --steps 10 --warmup 3
  run bert-base-accum4 120 --model bert-base --grad-accum 4 --contenders ftdist plain hf --rounds 2 --steps 10 --warmup 3
fi
if part memory; then
  # Per-worker max_memory_allocated and step time per memory lever; one GPU = one worker, so ZeRO-1..3
  # partition nothing here and show their own overhead; offload shows what leaves the device.
  if [ "$DEVICE" = cuda ]; then MEM=(--batch 8 --seq 512 --steps 5); else MEM=(--model tiny --batch 2 --seq 64 --steps 2); fi
  echo "== memory: python -m bench.memory --device $DEVICE --workers 1 ${MEM[*]}"
  timeout 480 "$PY" -m bench.memory --model gpt2-medium --device "$DEVICE" --precision "$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)" \
    --workers 1 "${MEM[@]}" --variants zero0 zero1 zero2 zero3 zero3-offload zero3-gc lora-zero0 lora-zero3 \
    --out "$OUT/memory.json" 2>"$OUT/memory.err" || { echo "!! memory failed:"; tail -20 "$OUT/memory.err"; }
fi
echo "== done: $(ls "$OUT"/*.json 2>/dev/null | wc -l) JSON file(s) in $OUT"
