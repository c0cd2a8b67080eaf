#!/usr/bin/env bash
# The first GPU check of the paper-scale path: one GPU, random weights of Pythia-2.8B's shape (no hub, offline),
# under 8 minutes on an 80 GB GPU. Writes $OUT_DIR/gpu_check.json (and one JSON per part beside it):
#   dpo_step    DPO steps of ComponentDPOTrainer vs stock TRL DPOTrainer: samples/s, peak memory, ratio
#   memory      the planner's memory estimate vs torch.cuda.max_memory_allocated of SFT-stage training steps
#               (float32 master weights, bf16 autocast: the stages' default)
#   alignment   one checkpoint's G analysis: time and memory of the full analysis vs TOT-only G
#   generation  805 prompts x 512 new tokens, HF generate vs vLLM (vLLM only where installed)
#     bash scripts/gpu_check.sh [OUT_DIR]            (OUT_DIR defaults to gpu_check/)
#     QUICK=1 bash scripts/gpu_check.sh /tmp/smoke   (CPU smoke of the same script at the tiny shape)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
py=${PYTHON:-python}
status=0
part() {  # name, command...: run one part, keep going when it fails (its error is in the JSON)
  local name=$1; shift
  local started=$SECONDS
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok ($((SECONDS - started)) s)"; else
    echo "   FAILED ($((SECONDS - started)) s), last lines:"; tail -5 "$out/$name.log"; status=1; fi
}
if [ "${QUICK:-0}" = 1 ]; then
  part dpo_step $py scripts/bench_dpo_step.py --model tiny --batch 8 --steps 2 --repeats 1 --warmup 1 --threads 1 --out "$out/dpo_step.json"
  part memory $py scripts/measure_memory.py --sizes tiny --tokens 32 --steps 1 --out "$out/memory.json"
  part alignment $py scripts/bench_alignment.py --model tiny --pairs 8 --dprime 8 --repeats 1 --warmup 0 --threads 1 --out "$out/alignment.json"
  part generation $py scripts/bench_generation.py --model tiny --prompts 8 --prompt-len 8 --new-tokens 8 --batch 4 --out "$out/generation.json"
else
  part dpo_step $py scripts/bench_dpo_step.py --model pythia-2.8b --batch 4 --seq-len 512 --steps 5 --repeats 2 --warmup 1 --device cuda --dtype bfloat16 --out "$out/dpo_step.json"
  part memory $py scripts/measure_memory.py --sizes pythia-2.8b --tokens 1024 --batch 4 --steps 2 --device cuda --dtype bfloat16 --out "$out/memory.json"
  part alignment $py scripts/bench_alignment.py --model pythia-2.8b --pairs 16 --dprime 16 --seq-len 512 --repeats 1 --warmup 0 --device cuda --dtype bfloat16 --out "$out/alignment.json"
  part generation $py scripts/bench_generation.py --model pythia-2.8b --prompts 805 --new-tokens 512 --batch 128 --out "$out/generation.json"
fi
$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
parts = {}
for name in ("dpo_step", "memory", "alignment", "generation"):
    f = out / f"{name}.json"
    parts[name] = json.loads(f.read_text()) if f.exists() else {"error": (out / f"{name}.log").read_text()[-2000:]}
(out / "gpu_check.json").write_text(json.dumps(parts, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
PY
exit $status
