#!/usr/bin/env bash
# Installs what Carrel's tests need on a fresh Debian machine, then runs every test.
#
#   tests/run.sh
#
# Needs: network access to crates.io, PyPI and Debian's packages, and root (or sudo) for apt-get
# when something is missing. Safe to run again: each step only does what is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

say "Toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cc >/dev/null 2>&1 || apt_install build-essential
cargo --version

say "Python test clients (openai SDK, pytest, schemathesis, openapi-spec-validator, pysip2, cryptography, jsonschema) in target/test-venv"
command -v python3 >/dev/null 2>&1 || apt_install python3
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi
venv=target/test-venv
if ! "$venv/bin/python" -c 'import openai, pytest, schemathesis, openapi_spec_validator, pysip2, cryptography, jsonschema' >/dev/null 2>&1; then
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
export PYTHON="$PWD/$venv/bin/python"
"$PYTHON" -c 'import openai; print("openai", openai.__version__)'

say "Browser tests (Debian's Chromium, playwright-core from npm)"
command -v chromium >/dev/null 2>&1 || apt_install chromium
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
chromium --version

say "Redis (shared by tests; each test uses its own key prefix)"
if ! (command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG); then
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping
# A test also starts a private redis-server on deploy/redis.conf (on a unix socket).
command -v redis-server >/dev/null 2>&1 || apt_install redis-server

say "Format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

say "Tests"
log=target/test-output.log
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one `test result:` per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
