#!/usr/bin/env bash
# Installs everything mmquant needs into .venv/ at the repo root, idempotently:
#   - Fashion-MNIST from the Debian package dataset-fashion-mnist, un-gzipped into data/fashion_mnist/
#   - torch 2.14.1 / torchvision 0.29.1, mmengine, mmcv 2.1.0 WITH its compiled ops, mmdet, mmpretrain,
#     onnx, onnxruntime, pytest, and mmquant itself (editable)
# mmcv 2.1.0 has no wheel for this torch: it is built from its sdist once (about 13 minutes on 2 cores)
# and the wheel is cached under $MMQUANT_CACHE keyed by the exact torch version and Python tag.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
CACHE=${MMQUANT_CACHE:-$HOME/.cache/mmquant}
MMCV_SDIST_URL=https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz
MMCV_SDIST_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f
log() { echo "[install] $*"; }

# ---- data -------------------------------------------------------------------------------------
FMNIST_SRC=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_SRC/train-images-idx3-ubyte.gz" ]; then
  log "installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
DATA=$ROOT/data/fashion_mnist
mkdir -p "$DATA"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ ! -f "$DATA/$f" ]; then
    gunzip -c "$FMNIST_SRC/$f.gz" > "$DATA/$f.tmp" && mv "$DATA/$f.tmp" "$DATA/$f"
  fi
done

# ---- python environment ----------------------------------------------------------------------
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=$ROOT/.venv/bin/python
PIP="$VPY -m pip --disable-pip-version-check -q"
have() { $VPY - "$@" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if all(version(n.split('==')[0]) == n.split('==')[1] for n in sys.argv[1:]) else 1)
PYEOF
}
if ! have torch==2.14.1 torchvision==0.29.1; then
  log "installing torch 2.14.1 / torchvision 0.29.1"
  $PIP install 'pip>=24'
  $PIP install torch==2.14.1 torchvision==0.29.1
fi
# mmcv's setup.py and mmengine import pkg_resources (gone in setuptools 82); torch asks for >= 77
$PIP install 'setuptools>=77,<82' wheel ninja

# ---- mmcv 2.1.0 with ops, built against the installed torch, wheel cached per torch version ----
if ! have mmcv==2.1.0 || ! $VPY -c 'import mmcv.ops' 2>/dev/null; then
  TORCH_TAG=$($VPY -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
  WHEEL_DIR=$CACHE/wheels/mmcv-2.1.0/$TORCH_TAG
  if ! ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    log "building mmcv 2.1.0 with ops against $TORCH_TAG (about 13 minutes on 2 cores, once)"
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    $VPY -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$MMCV_SDIST_URL" "$BUILD/mmcv.tar.gz"
    echo "$MMCV_SDIST_SHA256  $BUILD/mmcv.tar.gz" | sha256sum -c --quiet
    tar -xzf "$BUILD/mmcv.tar.gz" -C "$BUILD"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes c++14 / c++17
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-2.1.0/setup.py"
    grep -q 'std=c++20' "$BUILD/mmcv-2.1.0/setup.py"
    ( cd "$BUILD/mmcv-2.1.0" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        $VPY -m pip wheel --no-build-isolation --no-deps -w "$BUILD/dist" . )
    mkdir -p "$WHEEL_DIR"
    for w in "$BUILD"/dist/mmcv-2.1.0-*.whl; do cp "$w" "$WHEEL_DIR/.$(basename "$w").tmp" && mv "$WHEEL_DIR/.$(basename "$w").tmp" "$WHEEL_DIR/$(basename "$w")"; done
    rm -rf "$BUILD"
  fi
  log "installing cached mmcv wheel from $WHEEL_DIR"
  $PIP uninstall -y mmcv mmcv-lite >/dev/null 2>&1 || true   # e.g. a build without ops
  $PIP install "$WHEEL_DIR"/mmcv-2.1.0-*.whl
fi

# ---- the rest of the stack and mmquant itself -----------------------------------------------
$PIP install -r requirements.txt
# mmquant itself, editable, with its C++ kernels (BitSplit sweep, AdaRound soft weight) built
# against this torch (about a minute); skipped when installed from this checkout and every built
# kernel is newer than its source and setup.py
built() {   # $1: extension name, $2: its source
  local so
  so=$(ls mmquant/ptq/$1*.so 2>/dev/null | head -n 1 || true)
  [ -n "$so" ] && [ "$so" -nt "$2" ] && [ "$so" -nt setup.py ] \
    && (cd / && $VPY -c 'import sys, importlib; m = importlib.import_module("mmquant.ptq." + sys.argv[2]); sys.exit(not m.__file__.startswith(sys.argv[1]))' "$ROOT" "$1") 2>/dev/null
}
if ! built _bitsplit_sweep mmquant/ptq/csrc/bitsplit_sweep.cpp || ! built _adaround_soft mmquant/ptq/csrc/adaround_soft.cpp; then
  log "installing mmquant (editable) and building its C++ kernels"
  $PIP install --no-deps --no-build-isolation -e .
fi
$VPY -c 'import mmcv.ops, mmdet, mmpretrain, mmquant; from mmcv.ops import nms, RoIAlign; print("[install] ok: mmcv", mmcv.__version__, "with ops; mmdet", mmdet.__version__, "; mmpretrain", mmpretrain.__version__)'
