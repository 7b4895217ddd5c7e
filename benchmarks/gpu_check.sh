#!/usr/bin/env bash
# The GPU checks in one short script (a few minutes on one GPU): every family's engine vs the per-sample
# loop vs whole-model vmap on CUDA with the float64 exactness check, then a small end-to-end job on a
# GPU worker (extract.gpus_per_worker=1). Writes OUT/features_cuda.json and OUT/job_summary.json.
#
#   bash benchmarks/gpu_check.sh OUT            # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --dry-run OUT  # the same steps on the CPU at toy sizes (tested in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--dry-run" ]; then
  dry=1; shift
else
  dry=0
fi
out=${1:?usage: gpu_check.sh [--dry-run] OUT}
mkdir -p "$out"
if [ "$dry" = 1 ]; then
  device=cpu; models=(vae); bench=(--quick --batch-size 4 --repeats 1 --check-rows 2 --configs default)
  job=(extract.gpus_per_worker=0 fit.size=40 corpus.demo_rows_per_source=5 corpus.demo_id_rows=5
       extract.shard_size=16)
else
  device=cuda; models=(glow ddpm vae pixelcnn); bench=(--batch-size 256 --repeats 5 --threads 0)
  job=(extract.gpus_per_worker=1 extract.num_workers=1 corpus.demo_rows_per_source=500)
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
fi
"$PY" benchmarks/feature_throughput.py --device "$device" --models "${models[@]}" \
  --methods engine loop vmap "${bench[@]}" --out "$out/features_cuda.json"
"$PY" jobs/score_corpus.py output.uri="$out/job" run.id=gpu-check "${job[@]}"
cp "$out/job/runs/gpu-check/summary.json" "$out/job_summary.json"
echo "gpu check: $out/features_cuda.json $out/job_summary.json"
