#!/usr/bin/env bash
# Make a Chromium available for the viewer's browser tests (Playwright drives it headless).
# Keeps one that is already installed; else installs Debian's `chromium` with apt-get where
# we are root and apt-get exists; else says why the browser tests will be skipped.
set -euo pipefail
for name in "${TDB_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the viewer's browser tests"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; then
    echo "WARNING: apt-get could not install chromium: the viewer's browser tests will be skipped" >&2
  fi
else
  echo "no chromium found and it cannot be installed here (needs root and apt-get):" \
       "the viewer's browser tests will be skipped (install chromium or set TDB_CHROMIUM)" >&2
fi
