#!/usr/bin/env bash
# Installs, through apt-get and only when missing, what ferry's run and test
# commands need. Usage: scripts/deps.sh [run|test]
set -euo pipefail
want=(fuse3:fusermount3)
if [ "${1:-run}" = test ]; then
  want+=(iproute2:ip postgresql:/usr/lib/postgresql/15/bin/initdb)
fi
missing=()
for w in "${want[@]}"; do
  pkg=${w%%:*} bin=${w#*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "$bin" ]; then missing+=("$pkg"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing and could not be loaded" >&2; exit 1; }
