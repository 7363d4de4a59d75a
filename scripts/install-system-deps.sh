#!/usr/bin/env bash
# Debian packages the test suite runs for real: promtool and Prometheus (rule tests, end-to-end
# scrapes), Alertmanager (the paging alert's webhook), strace (what the file check touches, seen
# from the kernel: tests/test_strace.py), FUSE (fusermount from fuse3, and libfuse2, the library the
# fusepy package loads: a media mount that hangs, tests/faultkit.py) and libfaketime (the wall clock
# stepped under serve: tests/test_faults.py). Installs only what is missing.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
  || need+=(prometheus-alertmanager)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the report test renders its HTML headless
command -v fusermount >/dev/null 2>&1 || command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# fusepy finds libfuse.so.2 through ldconfig's cache (ctypes.util.find_library("fuse")).
ldconfig -p 2>/dev/null | grep 'libfuse\.so\.2 ' >/dev/null || need+=(libfuse2)
compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null || need+=(faketime)
[ ${#need[@]} -eq 0 ] && exit 0

mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to apt-get install: ${need[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
# The packages start their daemons on install; the tests start their own on free ports instead.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT
echo "installing Debian packages: ${need[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
