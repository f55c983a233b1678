#!/usr/bin/env bash
# Create .venv when missing and install the project with its extras (test, dali, plot, tensorboard, ffcv). A second
# call with the same pyproject.toml does nothing (stamp file). FFCV compiles against system libraries: they are installed with
# apt-get when missing and we are root; otherwise FFCV is skipped with a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.installed-$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

ffcv_libs_present() { pkg-config --exists opencv4 2>/dev/null && pkg-config --exists libturbojpeg 2>/dev/null; }
extras="test,dali,plot,tensorboard"
if ffcv_libs_present; then
  extras="$extras,ffcv"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing FFCV's system packages (pkg-config libturbojpeg0-dev libopencv-dev, ~1 min)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        pkg-config libturbojpeg0-dev libopencv-dev) >/tmp/pic-apt.log 2>&1; then
    extras="$extras,ffcv"
  else
    echo "setup: WARNING apt-get failed (see /tmp/pic-apt.log); continuing without FFCV"
  fi
else
  echo "setup: WARNING FFCV needs 'pkg-config libturbojpeg0-dev libopencv-dev' (apt) and this is not root;"
  echo "       continuing without FFCV (the ffcv backend and its tests are skipped)"
fi

echo "setup: pip install -e .[$extras] (torch is large: ~2 min)"
log=$(mktemp)
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" >"$log" 2>&1; then
  grep -v "is ignored: it is neither" "$log" | tail -40
  echo "setup: pip install failed (full log: $log)"
  exit 1
fi
"$VENV/bin/python" -c "import torch, torchvision, numba, rich" 
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "setup: done ($extras)"
