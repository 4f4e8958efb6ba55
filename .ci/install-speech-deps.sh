#!/usr/bin/env bash
# System package the speech data needs beyond the Python venv (Debian/Ubuntu CI images).
#
#   espeak-ng: synthesizes the built-in spoken-digits corpus offline (e2e_dist/data/synth_speech.py,
#       `e2e-dist data make-speech OUT`, data.source=spoken-digits). Its voices ship in the
#       package (espeak-ng-data), so nothing is downloaded at run time.
#
# Idempotent: installs only when the espeak-ng program is missing, and skips apt entirely otherwise.
# Needs root (or passwordless sudo); the Makefile/CI call it once before `make test`.
set -euo pipefail

if command -v espeak-ng >/dev/null 2>&1; then
  echo "install-speech-deps: espeak-ng present ($(espeak-ng --version | head -n 1))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-speech-deps: need root or sudo to install espeak-ng" >&2; exit 1
  fi
fi

echo "install-speech-deps: installing espeak-ng"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: only the synthesizer and its voice data (no audio servers).
$SUDO apt-get install -y -qq --no-install-recommends espeak-ng
espeak-ng --version | head -n 1
