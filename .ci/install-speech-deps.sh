#!/usr/bin/env bash
# System packages the speech data needs beyond the Python venv (Debian/Ubuntu CI images).
#
#   espeak-ng: formant synthesis; speaks most of the built-in spoken-digits corpus
#       (e2e_dist/data/synth_speech.py, `e2e-dist data make-speech OUT`, data.source=spoken-digits).
#   flite: CMU Flite (its voices awb, rms, slt, kal ship inside libflite1); its clustergen voices
#       awb and rms speak 40% of that corpus (data.synthesizers, default [espeak-ng, flite]).
#   festival + festvox-kallpc16k, festvox-kdlpc16k (LPC diphone voices kal, ked) and
#       festvox-us-slt-hts (HTS voice slt): the synthesis methods training never hears, for
#       benchmarks/speech_held_out.py and tests/data/test_rooms.py (skipped without them).
#
# Every voice ships in the packages: nothing is downloaded at run time. Room impulse responses
# and codecs (mu-law, GSM 06.10, MP3, Opus) need nothing here: numpy/scipy and libsndfile as
# bundled with the soundfile wheel.
#
# Idempotent: installs only what is missing, and skips apt entirely when nothing is.
# Needs root (or passwordless sudo); the Makefile/CI call it once before `make test`.
set -euo pipefail

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v flite >/dev/null 2>&1 || missing+=(flite)
command -v festival >/dev/null 2>&1 || missing+=(festival)
for voice in english/kal_diphone:festvox-kallpc16k english/ked_diphone:festvox-kdlpc16k \
             us/cmu_us_slt_arctic_hts:festvox-us-slt-hts; do
  [ -d "/usr/share/festival/voices/${voice%%:*}" ] || missing+=("${voice##*:}")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-speech-deps: espeak-ng, flite, festival and its voices present ($(espeak-ng --version | head -n 1))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-speech-deps: need root or sudo to install ${missing[*]}" >&2; exit 1
  fi
fi

echo "install-speech-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: only the synthesizers and their voice data (no audio servers).
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
espeak-ng --version | head -n 1
flite --version | head -n 1
