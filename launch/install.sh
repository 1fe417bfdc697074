#!/usr/bin/env bash
# Install livepipe and what it needs on a Debian/Ubuntu machine (idempotent; fast when done before).
#   launch/install.sh          the package, for running (a sound card needs libportaudio2)
#   launch/install.sh --test   also what the tests need: PulseAudio null sinks, espeak-ng, sox, Xvfb,
#                              chromium (the console's tests drive it through Playwright; no browser download)
set -euo pipefail
cd "$(dirname "$0")/.."

want=(libportaudio2)
if [[ "${1:-}" == "--test" ]]; then
  want+=(pulseaudio pulseaudio-utils alsa-utils libasound2-plugins espeak-ng sox xvfb chromium)
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null; then
    sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
    echo "install.sh: apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "install.sh: not a Debian system; install these yourself: ${missing[*]}" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".[all,test]"
if [[ "${1:-}" == "--test" ]]; then
  # The tests also run the oldest google-genai pyproject allows (its floor), in a venv they build
  # offline from these wheels: download them now, while there is a network, once.
  floor=$(sed -n 's/.*"google-genai>=\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/livepipe/google-genai-$floor"
  if [[ -n "$floor" ]] && ! compgen -G "$wheels/google_genai-$floor*.whl" >/dev/null; then
    echo "install.sh: downloading google-genai $floor (the oldest supported) into $wheels"
    rm -rf "$wheels.part"    # a half download must not pass for a complete one
    if python3 -m pip download -q --disable-pip-version-check -d "$wheels.part" "google-genai==$floor.*"; then
      rm -rf "$wheels" && mv "$wheels.part" "$wheels"
    else
      echo "install.sh: could not download google-genai $floor: its tests will skip" >&2
    fi
  fi
fi
echo "install.sh: livepipe $(python3 -c 'import importlib.metadata as m; print(m.version("livepipe"))') installed ($(command -v livepipe))"
