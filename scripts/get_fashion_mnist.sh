#!/usr/bin/env bash
# Obtain Fashion-MNIST for the demo: an existing copy, Debian's package, or say how to get it.
set -u
for d in "${PROCKD_FASHION_MNIST:-}" /usr/share/datasets/fashion-mnist "$HOME/.cache/prockd/data/fashion-mnist"; do
  if [ -n "$d" ] && [ -f "$d/train-images-idx3-ubyte.gz" ]; then echo "Fashion-MNIST: found in $d"; exit 0; fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"
  if ! apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1
  fi
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && { echo "Fashion-MNIST: installed"; exit 0; }
fi
echo "Fashion-MNIST not found: install Debian's 'dataset-fashion-mnist', or put the four IDX .gz files in a directory and set PROCKD_FASHION_MNIST (or data.root), or set data.download=true to fetch the official files." >&2
exit 0
