#!/usr/bin/env bash
# The throughput benchmark on one GPU: ViT-B-16 (random weights, open_clip's loading path) on 5,000
# generated JPEGs through coft.pipeline.adapt with bf16 autocast; every stage next to the model's
# own compute, the decoded-image cache's build rate, and peak GPU memory. No comparison with the
# code before issue 11 there: that code would need hours for this case.
#
#   benchmarks/gpu_check.sh download   # here, with network to PyPI: wheels the GPU machine lacks, into .whl/
#   benchmarks/gpu_check.sh            # there: install them into /tmp/site, run, write $OUT/throughput.json
#
# The GPU machine this project is sometimes lent (an H200) has Python 3.12 with torch, torchvision,
# numpy, pillow, timm, regex, huggingface_hub and safetensors, but no network, no open_clip_torch and
# no kornia. .whl/ is ignored by git (.git/info/exclude) and travels with `carry: [".whl"]`.
# Budget: about 6 minutes on an H200; IMAGES and CONFIG (JSON overrides) shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 kornia==0.9.0 kornia_rs==0.2.0 ftfy==6.3.1 wcwidth==0.9.4)

if [ "${1:-}" = "download" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, open_clip, kornia; print("torch", torch.__version__, "open_clip", open_clip.__version__,
"kornia", kornia.__version__, "cuda", torch.cuda.is_available())'
out=${OUT:-/tmp}
config=${CONFIG:-"{}"}
python3 benchmarks/throughput.py --case vit-b-16 --device cuda --baseline none --threads "$(nproc)" \
  --images "${IMAGES:-5000}" --config "$config" --scratch /tmp/coft-gpu-check --json "$out/throughput.json" \
  2>&1 | tee "$out/throughput.txt"
