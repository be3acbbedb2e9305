#!/usr/bin/env bash
# CUDA figures for docs/performance.md, in one call on a lent GPU machine (< 8 min).
#
#   here, once:        bash benchmarks/gpu.sh prepare   # fetch the wheels the GPU image lacks into .whl/
#   on the device:     bash benchmarks/gpu.sh           # device tool: run with carry [".whl"]
#
# The GPU image has Python 3.12 with torch, torchvision, pillow, pyarrow, scipy, click and tqdm,
# but no imagehash (nor PyWavelets, which it needs): `prepare` downloads both as cp312 wheels and
# keeps .whl/ out of git. Figures go to stdout and to $OUT (the device tool's folder) or /tmp/gpu-out.
# FILES (default 6000) sets the size of the generated folder of 1024x768 JPEGs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for spec in 'ImageHash>=4.3' 'PyWavelets>=1.6'; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec"
    done
    ls -l .whl
    exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc
python3 -c "import imagehash, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    || { echo "imagehash or torch missing: run 'bash benchmarks/gpu.sh prepare' here and carry .whl"; exit 3; }
timeout 450 python3 benchmarks/gpu.py --files "${FILES:-6000}" --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
