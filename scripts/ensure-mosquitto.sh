#!/usr/bin/env bash
# Install Mosquitto for the broker tests where we can (root with apt-get); otherwise say what to do.
# Without it the Mosquitto tests skip on a laptop, and fail under CI=true.
set -u
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto (apt-get)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq mosquitto mosquitto-clients >/dev/null \
    && exit 0
  echo "apt-get install mosquitto failed" >&2
else
  echo "mosquitto is not installed and this is not root with apt-get:" \
       "install it (apt-get install mosquitto mosquitto-clients / brew install mosquitto)" \
       "or the Mosquitto tests will skip." >&2
fi
# Under CI the tests themselves fail loudly when Mosquitto is missing.
exit 0
