#!/usr/bin/env bash
# Install what the broker tests need where we can (root with apt-get); otherwise say what to do.
#   bash scripts/ensure-installed.sh PROGRAM PACKAGE...   (PROGRAM: a command name or a path)
# Without it the tests that need it skip on a laptop, and fail under CI=true.
set -u
program=$1; shift
if command -v "$program" >/dev/null 2>&1 || [ -x "$program" ] || [ -x "/usr/sbin/$program" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing $* (apt-get)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null && exit 0
  echo "apt-get install $* failed" >&2
else
  echo "$program is not installed and this is not root with apt-get:" \
       "install it (apt-get install $*) or the tests that need it will skip." >&2
fi
# Under CI the tests themselves fail loudly when it is missing.
exit 0
