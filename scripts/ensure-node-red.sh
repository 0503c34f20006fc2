#!/usr/bin/env bash
# Install Node-RED (pinned) into a per-machine cache directory, once; print nothing when it is there.
#   bash scripts/ensure-node-red.sh [DIR]
# DIR defaults to $NODE_RED_HOME, else ${XDG_CACHE_HOME:-~/.cache}/mqtt-offload/node-red-<version>;
# tests/test_node_red.py looks in the same place. Without node and npm it says so and exits 0: the
# test then skips on a laptop, and fails under CI=true.
set -u
version=4.1.8
dir=${1:-${NODE_RED_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-offload/node-red-$version}}
red=$dir/node_modules/node-red/red.js
if [ -f "$red" ] && [ -f "$dir/.installed" ]; then
  exit 0
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "node and npm are not installed: install Node.js 18+ (apt-get install nodejs npm)," \
       "or tests/test_node_red.py will skip." >&2
  exit 0
fi
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
  echo "node $(node --version) is too old for Node-RED $version (18 or later)," \
       "or tests/test_node_red.py will skip." >&2
  exit 0
fi
mkdir -p "$dir"
echo "installing node-red@$version into $dir (npm)..."
# --prefix keeps it out of the global tree; no audit or funding chatter; a bounded time.
if timeout 900 npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
     "node-red@$version" >/dev/null; then
  touch "$dir/.installed"
  exit 0
fi
echo "npm install node-red@$version failed" >&2
exit 0
