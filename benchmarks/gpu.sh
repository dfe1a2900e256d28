#!/usr/bin/env bash
# Phase-1 figures on one GPU (issue 17), unattended, under 8 minutes on an H100:
#   bash benchmarks/gpu.sh 2>&1 | tee gpu_figures.txt
# SD v1.5 architecture with random weights (written to a temp dir, no download), 256², N = 4, bf16 autocast,
# batch 32: fused closed form, fused MC and naive MC (N noises batched) at M = 4 and 16, per kernel setting,
# then `python -m cli precompute` end to end (1024 JPEG/PNG, decode → features → store), eager kernel settings.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 470 python benchmarks/precompute.py --device cuda --arch sd15 --dtype bfloat16 --batch-size 32 \
    --resolution 256 --num-noises 4 --num-weight-samples 4 16 --iters 3 --warmup 1 \
    --kernels default channels_last bf16_weights cudnn_benchmark eager_all compile \
    --end-to-end --e2e-kernel eager_all --e2e-images 1024 --e2e-image-size 512 --e2e-workers 8
