#!/usr/bin/env bash
# Installs the tools the loopback test needs (strace, ip, unshare) when they are missing and
# this is root with apt; otherwise that test skips with the reason.
set -u
missing=()
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    >/dev/null 2>&1 || echo "setup_tools: could not install ${missing[*]}; the loopback test will skip"
else
  echo "setup_tools: ${missing[*]} missing and not root; the loopback test will skip"
fi
exit 0
