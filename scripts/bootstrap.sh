#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for Ambit; safe to run any number of times.
#   system packages (apt-get), kernel headers where bcc looks for them, the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-venv python3-dev python3-bpfcc linux-headers-amd64 iproute2 iperf3 tshark tcpdump stunnel4 nftables)
# Only the tests use these (a real Prometheus scrapes the agent's admin endpoint); the image leaves them out
# (AMBIT_RUNTIME_ONLY=1 in daemonset/Containerfile).
TEST_PACKAGES=(prometheus)
if [ "${AMBIT_RUNTIME_ONLY:-0}" != 1 ]; then
  APT_PACKAGES+=("${TEST_PACKAGES[@]}")
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. Kernels without their own headers get
# Debian's (networking programs only use uapi types, so another version's headers serve).
mod=/lib/modules/$(uname -r)
if [ ! -e "$mod/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$hdr" ] && [ -n "$common" ]; then
    echo "bootstrap: linking $mod/build -> $hdr (kernel ships no headers)"
    as_root mkdir -p "$mod"
    as_root ln -sfn "$hdr" "$mod/build"
    as_root ln -sfn "$common" "$mod/source"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv from /usr/bin/python3 (with system site packages, for bcc)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
echo "bootstrap: installing Python packages into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
