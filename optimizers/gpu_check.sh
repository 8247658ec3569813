#!/usr/bin/env bash
# The fused optimizer steps and fast 4-bit training on one CUDA GPU, in one go (about 8 minutes on an H200):
#   1. the CUDA tests of the fused steps, the optimizers on CUDA and the quantizers;
#   2. `bench perf optimizers --check`: fused against foreach on the device, then step times of torch's fused AdamW,
#      SPAM fused, Stable-SPAM fused and foreach at LLaMA-130M/350M/1B in float32 and bfloat16 (each also queued
#      ahead of the device: its device time alone);
#   3. `bench perf train` at 130M: compiled bf16, int4 and fp4 training, and the plain transformers recipe (anchor).
# FP4's compilation at 130M has taken over 150 s: give it a call of its own if it is cut here
# (`python3 -m tasks.llm_pretrain.throughput --size 130m --variants compile-fp4 --steps 6 --log-every 2`).
# Results go to $OUT (JSON and logs); a short table is printed last. Run from the repository root:
#   OUT=/tmp/gpu_check bash optimizers/gpu_check.sh
set -u
OUT=${OUT:-gpu_check}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
{ git rev-parse HEAD; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/env.txt" 2>&1

echo "== tests" >&2
timeout 160 $PY -m pytest -q -p no:cacheprovider tests/optimizers/test_opt_fused.py tests/optimizers/test_opt_cuda.py \
    tests/tasks/llm_pretrain/test_llm_quant.py > "$OUT/tests.txt" 2>&1
echo "tests exit code $?" >> "$OUT/tests.txt"
tail -4 "$OUT/tests.txt" >&2

echo "== optimizer step times" >&2
timeout 140 $PY -m optimizers.benchmark --check --size 130m,350m,1b --dtype float32,bfloat16 --steps 30 --warmup 25 \
    --names torch_adamw_fused,spam_fused,stable_spam_fused,stable_spam_foreach --json "$OUT/optimizers.json" \
    > "$OUT/optimizers.txt" 2>&1
echo "optimizer benchmark exit code $?" >&2

echo "== training throughput" >&2
timeout 220 $PY -m tasks.llm_pretrain.throughput --size 130m --variants compile,compile-int4,anchor,compile-fp4 \
    --steps 6 --log-every 2 --json "$OUT/train.json" > "$OUT/train.txt" 2>&1
echo "training benchmark exit code $?" >&2

$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print(open(os.path.join(out, "env.txt")).read().strip())
tests = open(os.path.join(out, "tests.txt")).read().strip().splitlines()
print("tests:", tests[-2] if len(tests) > 1 else tests)
try:
    report = json.load(open(os.path.join(out, "optimizers.json")))
    bad = [r for r in report.get("check", []) if not r["ok"]]
    print(f"check: {len(report.get('check', [])) - len(bad)} ok, {len(bad)} failed",
          *(f"\n  FAIL {r['name']} {r['dtype']} state={r['state_dtype']} {r['hparams']}: param {r['param']:.2e} "
            f"m {r['exp_avg']:.2e} v {r['exp_avg_sq']:.2e}" for r in bad))
    print("ms/step (x torch fused AdamW):")
    for run in report["runs"]:
        cells = [f"{n} {r['ms']:.2f} ({r['ratio']:.2f}x" + (f"; device {r['device_ms']:.2f}" if r.get("device_ms") else "")
                 + ")" for n, r in run["results"].items()]
        print(f"  {run['size']:>4} {run['dtype']:<8}", " | ".join(cells))
except (OSError, ValueError, KeyError) as exc:
    print("optimizer benchmark: no results", exc)
try:
    rows = json.load(open(os.path.join(out, "train.json")))["results"]
    base = next((r["tokens_per_sec"] for r in rows if r["variant"] == "compile"), None)
    print("training 130M tokens/s (step time x compiled bf16):")
    for r in rows:
        ratio = f"{base / r['tokens_per_sec']:.2f}x" if base else "-"
        print(f"  {r['variant']:<14} {r['tokens_per_sec']:>10,.0f}  {ratio}  MFU {100 * r['mfu']:.1f}%")
except (OSError, ValueError, KeyError) as exc:
    print("training benchmark: no results", exc)
PYEOF
