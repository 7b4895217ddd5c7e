#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with gradood and its pinned dependencies, plus FashionMNIST.
# FashionMNIST comes from the Debian package dataset-fashion-mnist when we can install it (root + apt),
# else from torchvision's download; the last line says which one is in use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "apt-get install dataset-fashion-mnist failed; falling back to torchvision's download"
fi
.venv/bin/python -m gradood.data.fashion_mnist --download
