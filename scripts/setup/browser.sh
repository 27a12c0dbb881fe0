#!/usr/bin/env bash
# The dashboard's browser tests drive Debian's chromium through Playwright (never Playwright's own
# browser downloads). Idempotent: installs chromium only when /usr/bin/chromium is missing, and only
# as root; otherwise it says why, and tests/browser skips with the same reason.
set -uo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  echo "browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "browser: $CHROMIUM is missing and this is not root; install Debian's chromium to run tests/browser"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "browser: $CHROMIUM is missing and there is no apt-get; install chromium to run tests/browser"
  exit 0
fi
echo "browser: installing Debian's chromium"
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/tmp/crucible-browser-setup.log 2>&1; then
  echo "browser: apt-get install chromium failed (see /tmp/crucible-browser-setup.log); tests/browser will skip"
  tail -n 5 /tmp/crucible-browser-setup.log
fi
exit 0
