#!/usr/bin/env bash
# The GPU check: one H100/H200, under 10 minutes. Run from the repository root:
#
#     bash bench/gpu_check.sh            # results (logs, CSV, tables) under ${OUT:-bench/results/gpu}
#
# 1. the tests that need CUDA (tests/test_cuda.py: bf16 fine-tuning keeps fp32 masters, bf16/fp16 attention
#    against fp32, segment on CUDA against the CPU);
# 2. bench_model on the SD 2.1 architecture (random weights) at 512: 1 and 5 shots, naive vs support memory
#    reused vs reused + batched, fp32 / bf16 / fp16, 3 labels batched across labels; bf16 with torch.compile;
# 3. one fine-tuning step at 512 (LoRA and full, bf16 autocast over fp32 masters): time and peak memory.
# The bar: 5-shot >= 50 queries/s in bf16, and >= 3x the naive way in the same run.
#
# Needs Python with torch (CUDA) and this project's model dependencies (diffusers, peft, safetensors,
# transformers). A machine without them gets them from wheels in .whl/ (pip download them elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import diffusers, peft" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF' | tee "$OUT/env.txt"
import torch, diffusers, peft
print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
EOF
status=0
echo "== 1. CUDA tests"
timeout 90 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1
echo "== 2. bench_model, SD 2.1 architecture at 512 (eager: bf16, fp16, fp32; then bf16 with torch.compile)"
timeout 180 python3 -m bench.bench_model --arch sd21 --device cuda --dtype bfloat16 float16 float32 \
  --shots 1 5 --queries 32 --batch 8 --labels 3 --resolution 512 \
  --csv "$OUT/model.csv" 2>&1 | tee "$OUT/bench_model.log" || status=1
timeout 180 python3 -m bench.bench_model --arch sd21 --device cuda --dtype bfloat16 --compile yes \
  --shots 1 5 --queries 32 --batch 8 --labels 0 --resolution 512 \
  --csv "$OUT/model_compiled.csv" 2>&1 | tee "$OUT/bench_model_compiled.log" || status=1
echo "== 3. fine-tuning step at 512"
timeout 120 python3 -m bench.bench_train_step --device cuda --csv "$OUT/train_step.csv" 2>&1 | tee "$OUT/train_step.log" || status=1
exit $status
