#!/usr/bin/env bash
# Font packages the `digit-glyphs` data source renders digits from (e2e_dist/data/fonts.py).
#
#   Sans, serif, mono, slab and script designs, ~70 MB installed, all in Debian main. Without them
#   the source still works from the DejaVu, STIX and Computer Modern files matplotlib ships (3
#   designs instead of ~18), and the held-out-font figures in BENCHMARKS.md do not apply.
#
# Idempotent: skips apt when every package is installed. Needs root (or passwordless sudo); the
# Makefile's system-deps target (run by `make test`) calls it.
set -euo pipefail

PACKAGES=(fonts-liberation fonts-freefont-ttf fonts-urw-base35 fonts-texgyre fonts-lato fonts-open-sans
          fonts-roboto-unhinted fonts-go fonts-hack fonts-inconsolata fonts-cantarell fonts-linuxlibertine
          fonts-croscore fonts-crosextra-carlito)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-font-deps: all ${#PACKAGES[@]} font packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-font-deps: need root or sudo to install ${missing[*]}" >&2; exit 1
  fi
fi

echo "install-font-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
