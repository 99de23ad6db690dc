#!/usr/bin/env bash
# Load benchmark: a fast mock upstream, Carrel (release, auth on) and nginx as a plain reverse
# proxy, each driven by oha. Not a test: it prints numbers for deploy/bench/RESULTS.md.
#
#   deploy/bench/run.sh [--duration 15] [--rounds 3] [--only "chat c=1"] [--out deploy/bench/RESULTS.md]
#                       [--baseline path/to/an/earlier/carrel]   (before/after from one run)
#                       [--store redis [--redis-url redis://127.0.0.1:6379]]   (Redis mode beside embedded)
#                       [--unsigned]   (the same Carrel with response signing off, beside it)
#
# Installs what it needs when missing: nginx (Debian), oha (crates.io) and, for --store redis,
# redis-cli (Debian's redis-tools). --store redis needs a running Redis; it does not start one.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
command -v oha >/dev/null 2>&1 || cargo install --locked oha
case " $* " in
  *" --store redis "* | *" --store=redis "*)
    if ! command -v redis-cli >/dev/null 2>&1; then
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools >/dev/null
    fi ;;
esac
cargo build --release --locked -p carrel-gateway -p carrel-tests --bin carrel --bin mock-upstream --bin carrel-load
exec python3 deploy/bench/bench.py "$@"
