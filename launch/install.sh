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
echo "install.sh: livepipe $(python3 -c 'import importlib.metadata as m; print(m.version("livepipe"))') installed ($(command -v livepipe))"
