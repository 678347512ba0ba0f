#!/usr/bin/env bash
# Installs the system tools the test suite drives for real, when they are missing:
# headless Chromium (dashboard test), promtool (alert-rule tests), curl (the README's and
# docs/dashboard.md's commands are run as written), unshare and ip (the README's commands
# run in a private network namespace), systemd-analyze (the shipped units' verify and
# security tests), FUSE (power-cut and I/O-error tests), Nginx and envsubst (reverse-proxy
# tests: test_proxy_nginx.py renders and runs the shipped Nginx config).
# Needs root and apt-get; elsewhere it says what is missing and the tests that need a
# tool skip locally (under CI=true they fail instead).
set -u
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# README "Running it yourself" and docs/dashboard.md tests: curl; the README test also a
# private network namespace (unshare, ip).
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# Power-cut and I/O-error tests: a FUSE file system (mfusepy needs libfuse 2; fusermount
# from fuse3 unmounts it).
command -v fusermount >/dev/null 2>&1 || command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2' || missing+=(libfuse2)
# Reverse-proxy tests: nginx (Debian installs it in /usr/sbin) and envsubst.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v envsubst >/dev/null 2>&1 || missing+=(gettext-base)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null \
    && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "install-test-tools: could not install ${missing[*]}" >&2
else
  echo "install-test-tools: missing ${missing[*]} (install them to run every test)" >&2
fi
exit 0
