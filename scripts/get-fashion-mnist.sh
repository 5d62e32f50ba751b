#!/usr/bin/env bash
# Make Fashion-MNIST available: Debian's dataset-fashion-mnist package where apt is available,
# else a download from the dataset's official source with checksum verification.
set -euo pipefail
PY="${1:-.venv/bin/python}"
if "$PY" -m meal_ray.cli data fashion-mnist --check >/dev/null 2>&1; then
  "$PY" -m meal_ray.cli data fashion-mnist --check
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Debian package dataset-fashion-mnist ..."
  if ! apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "apt could not install dataset-fashion-mnist; downloading instead."
  fi
fi
"$PY" -m meal_ray.cli data fashion-mnist --download
