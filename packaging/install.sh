#!/usr/bin/env bash
# Installs everything Pruning Studio needs into ./.venv (idempotent; safe to re-run).
#   bash packaging/install.sh          # the studio
#   bash packaging/install.sh --test   # the studio plus the test tools (and Ray, which they cover)
#   bash packaging/install.sh --ray    # the studio plus Ray, for scans and fine-tuning on a cluster
# Debian packages for a real Qt window / Xvfb are installed when missing (root or sudo).
# torch comes from the CPU wheel (torch==2.13.0); set STUDIO_TORCH to install another build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test,ray]"
[ "${1:-}" = "--ray" ] && extras="[ray]"

debs=(xvfb xauth libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0
      libxcb-render-util0 libxcb-image0 libxcb-randr0 libxcb-xinerama0 libegl1 libgl1 libfontconfig1
      libdbus-1-3
      # QtWebEngine (the embedded Netron view)
      libnss3 libxcomposite1 libxdamage1 libxrandr2 libxtst6 libxkbfile1 libgbm1 libasound2)
if command -v dpkg >/dev/null && command -v apt-get >/dev/null; then
  missing=()
  for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${pip[@]}" install "${STUDIO_TORCH:-torch==2.13.0}"
# onnx2torch declares torchvision, which does not load beside the CPU torch wheel; it is
# needed only for NMS/RoiAlign (studio/core/onnx_import.py explains the stand-in).
"${pip[@]}" install --no-deps "onnx2torch==1.5.15"
"${pip[@]}" install -e ".${extras}"
echo "Pruning Studio installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
