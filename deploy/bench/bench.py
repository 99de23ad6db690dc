#!/usr/bin/env python3
"""Drives the load benchmark; deploy/bench/run.sh builds and installs what it needs first.

Three targets on one machine, in one run: the mock upstream directly, nginx as a plain reverse
proxy in front of it, and Carrel (release build, API-key auth on) in front of it. For each
scenario the targets run back to back, so each ratio compares numbers from the same minutes.
Every process binds port 0 or a port the OS just handed out; everything stops at the end.

With `--store redis`, a fourth target `redis` is a second Carrel of the same binary and limits on
the Redis store (`[store] kind = "redis"`, a key prefix of its own for this run); the report adds
Redis mode against embedded and the Redis memory its usage records take. The run's keys are
deleted at the end.
"""

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release"
MODEL = "bench-model"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello, library!"}]})
STREAM = json.dumps({"model": MODEL, "stream": True,
                     "messages": [{"role": "user", "content": "Hello, library!"}]})
# At temperature 0 the answer is fixed, so Carrel's response cache keeps it: after the first
# request every one is a hit (issue 8). nginx and the mock see the same body.
CACHED = json.dumps({"model": MODEL, "temperature": 0,
                     "messages": [{"role": "user", "content": "Hello, library!"}]})
EMBED = json.dumps({"model": MODEL, "input": "Hello, library!"})
CHAT_PATH, EMBED_PATH = "/v1/chat/completions", "/v1/embeddings"
SCENARIOS = [
    # name, concurrency, body, path, tool: `oha`, or `carrel-load` for streams (oha cannot time
    # a stream's first byte: its p50/p99 there are the time to the first event)
    ("chat c=1", 1, CHAT, CHAT_PATH, "oha"),
    ("chat c=64", 64, CHAT, CHAT_PATH, "oha"),
    ("stream c=64", 64, STREAM, CHAT_PATH, "oha"),
    ("stream ttfb c=16", 16, STREAM, CHAT_PATH, "carrel-load"),
    # Embeddings are deterministic, so Carrel caches them by policy; this one asks past the
    # cache (`x-carrel-cache: bypass`) to measure the way to the provider.
    ("embeddings c=64", 64, EMBED, EMBED_PATH, "oha"),
    ("cached c=64", 64, CACHED, CHAT_PATH, "oha"),
]
# The mock streams this model a word a second (the open-streams measure, `--open-streams`).
SLOW = json.dumps({"model": "slow-model", "stream": True,
                   "messages": [{"role": "user", "content": "Tell me a long story."}]})
REDIS_URL = "redis://127.0.0.1:6379"
# Carrel on Redis refuses to start without a pepper (replicas must share one); any fixed 64 hex
# digits do for a benchmark.
PEPPER = "ab" * 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env=None, log=None):
    """Starts a process and returns it with its first stdout line. With `log`, its stderr goes
    to that file, whose end is shown if the process exits before it was ready."""
    stderr = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, **(env or {})})
    finally:
        if log:
            stderr.close()
    line = proc.stdout.readline().strip()
    if not line:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-20:]) if log else ""
        raise SystemExit(f"{cmd[0]} exited before it was ready\n{tail}".rstrip())
    return proc, line


def http_json(method, url, body=None, token=None):
    req = urllib.request.Request(url, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def wait_http(url, attempts=100):
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def nginx_conf(work, port, upstream):
    return f"""
worker_processes {os.cpu_count()};
worker_rlimit_nofile 65536;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream mock {{ server {upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 2m;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def oha(url, concurrency, body, seconds, token):
    cmd = ["oha", "-z", f"{seconds}s", "-c", str(concurrency), "--no-tui", "--output-format", "json",
           "-m", "POST", "-H", "content-type: application/json", "-d", body, url]
    if url.endswith(EMBED_PATH):
        cmd[1:1] = ["-H", "x-carrel-cache: bypass"]
    if token:
        cmd[1:1] = ["-H", f"authorization: Bearer {token}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    codes = data.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    bad = sum(v for k, v in codes.items() if not k.startswith("2"))
    # In-flight requests cut off when the duration ends are not failures of the target.
    errors = sum(v for k, v in data.get("errorDistribution", {}).items()
                 if "deadline" not in k)
    p = data["latencyPercentiles"]
    return {
        "requests": ok + bad,
        "rps": data["summary"]["requestsPerSec"] * (ok / max(ok + bad, 1)),
        "p50_us": p["p50"] * 1e6,
        "p99_us": p["p99"] * 1e6,
        "non2xx": bad,
        "errors": errors,
    }


def carrel_load(binary, mode, url, body, n, seconds, token):
    """Runs `carrel-load stream` and returns its numbers in oha's shape: streams/s as req/s,
    and the time to the first event as p50/p99."""
    cmd = [str(binary), mode, url, body, str(n), str(seconds)] + ([token] if token else [])
    data = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                     text=True).stdout.splitlines()[-1])
    return {
        "requests": data["streams"],
        "rps": data["streams_per_sec"],
        "p50_us": data["ttfb_p50_us"],
        "p99_us": data["ttfb_p99_us"],
        "total_p50_us": data["total_p50_us"],
        "non2xx": 0,
        "errors": data["errors"],
    }


def rss_kib(root_pid, field="VmRSS"):
    """Resident memory of a process and its direct children (nginx's workers), in KiB; with
    `field="VmHWM"`, the peak each reached."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(entry.name), int(fields.get("PPid", "0").strip() or 0)
        if (pid == root_pid or ppid == root_pid) and field in fields:
            total += int(fields[field].split()[0])
    return total


def raise_fd_limit(wanted):
    """Lets this process and its children (the proxies, the load generators) open `wanted`
    files; returns how many they may."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in [(wanted, max(wanted, hard)), (min(wanted, hard), hard)]:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return limit[0]
        except (ValueError, OSError):
            continue
    return soft


def open_streams(load_bin, targets, n, seconds=8):
    """For each proxy: its memory idle, then with `n` slow streams open through it (each on
    its own client connection and its own upstream connection). Returns rows for the report."""
    rows = []
    for name, base, token, pid in targets:
        before = rss_kib(pid)
        proc = subprocess.Popen([str(load_bin), "hold", base + CHAT_PATH, SLOW, str(n),
                                 str(seconds)] + ([token] if token else []),
                                stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline().split()
        opened = int(line[1]) if len(line) == 2 and line[0] == "open" else 0
        # Measured once the streams are settled in, not in the burst of opening them.
        time.sleep(seconds / 2)
        during = rss_kib(pid)
        summary = json.loads(proc.stdout.read().splitlines()[-1])
        proc.wait()
        rows.append({"target": name, "asked": n, "open": opened, "before_kib": before,
                     "during_kib": during, "seconds_to_open": summary["seconds_to_open"]})
        print(f"open streams {name:7} {opened}/{n} open  RSS {before / 1024:.1f} → "
              f"{during / 1024:.1f} MiB  ({(during - before) / max(opened, 1):.1f} KiB a stream)",
              flush=True)
    return rows


def soak(targets, seconds, every=10):
    """Chat at concurrency 64 through Carrel for `seconds`, its resident memory read every
    `every` seconds; the report line compares the samples after the first minute."""
    _, base, token, pid = next(t for t in targets if t[0] == "carrel")
    samples, served = [], 0
    for _ in range(max(seconds // every, 1)):
        served += oha(base + CHAT_PATH, 64, CHAT, every, token)["requests"]
        samples.append(rss_kib(pid) / 1024)
        print(f"soak {len(samples) * every:5d} s  RSS {samples[-1]:6.1f} MiB", flush=True)
    settled = samples[6:] or samples
    low, high = min(settled), max(settled)
    return [f"Soak: {served} chat requests at concurrency 64 over {len(samples) * every} s; "
            f"Carrel's RSS after the first minute stayed between {low:.1f} and {high:.1f} MiB "
            f"({(high - low) / low * 100:.1f}% apart); samples every {every} s: "
            + ", ".join(f"{m:.1f}" for m in samples) + " MiB."]


def open_streams_lines(rows):
    lines = ["| target | streams open | RSS idle MiB | RSS with the streams open MiB "
             "| KiB per stream | seconds to open them all |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['open']} of {r['asked']} | {r['before_kib'] / 1024:.1f} "
                     f"| {r['during_kib'] / 1024:.1f} "
                     f"| {(r['during_kib'] - r['before_kib']) / max(r['open'], 1):.1f} "
                     f"| {r['seconds_to_open']:.1f} |")
    return lines


def cpu_seconds(root_pid):
    """User + system CPU time of a process and its direct children (nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == root_pid or ppid == root_pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nginx_v = subprocess.run([nginx_bin(), "-v"], capture_output=True, text=True).stderr.strip()
    oha_v = subprocess.run(["oha", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
            f"{platform.release()}; {nginx_v}; {oha_v}")


# Limits on every level a request counts against, all far above what a run uses, so every
# request pays for the full check and reservation without being refused.
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_day": 400_000_000_000,
          "tokens_per_month": 400_000_000_000, "cost_per_month_usd": 100_000,
          "concurrent_streams": 100_000, "patron_tokens_per_day": 1_000_000_000}


def start_carrel(binary, cfg, data_dir, limits=True, env=None, log=None):
    """Starts `carrel serve` on free ports with an institution and a key; returns the process,
    the public URL and the key. With `limits`, the institution, a site, a group, the key (in
    that site and group) and the model all have every kind of limit set. `env` is added to its
    environment; `log` (a file) gets its stderr."""
    admin_token = "bench-admin-token"
    carrel, line = start([str(binary), "serve", "--config", str(cfg), "--data-dir", str(data_dir),
                          "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                         env={"CARREL_ADMIN_TOKEN": admin_token, **(env or {})}, log=log)
    words = dict(w.split("=", 1) for w in line.split()[1:])
    carrel_url, admin_url = words["public"], words["admin"]
    inst = http_json("POST", f"{admin_url}/admin/v1/institutions",
                     {"name": "Bench Library", "kind": "library", "region": "US-IL",
                      "timezone": "America/Chicago"}, admin_token)
    body = {"name": "bench", "kind": "service"}
    if limits:
        site = http_json("POST", f"{admin_url}/admin/v1/institutions/{inst['id']}/sites",
                         {"name": "Main branch"}, admin_token)
        group = http_json("POST", f"{admin_url}/admin/v1/institutions/{inst['id']}/groups",
                          {"name": "Adults", "kind": "patron_type"}, admin_token)
        body.update(site_id=site["id"], group_id=group["id"])
    key = http_json("POST", f"{admin_url}/admin/v1/institutions/{inst['id']}/keys", body,
                    admin_token)
    if limits:
        # Children are carved out of their parents: each level gets a smaller share.
        for path, share in [(f"institutions/{inst['id']}", 1.0), (f"sites/{site['id']}", 0.5),
                            (f"groups/{group['id']}", 0.5), (f"keys/{key['id']}", 0.4),
                            (f"models/{MODEL}", 1.0)]:
            scaled = {k: (v * share if k == "cost_per_month_usd" else int(v * share))
                      for k, v in LIMITS.items()}
            http_json("PUT", f"{admin_url}/admin/v1/{path}/limits", scaled, admin_token)
    return carrel, carrel_url, key["secret"]


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def carrel_config(mock_addr, store=""):
    """Carrel's config: the mock as its one provider and model, then `store` (a `[store]`
    section, or nothing for the embedded store)."""
    return f"""
[log]
level = "warn"
[[providers]]
name = "mock"
base_url = "http://{mock_addr}/v1"
[[models]]
name = "{MODEL}"
provider = "mock"
tier = "baseline"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.6
[[models]]
name = "slow-model"
provider = "mock"
tier = "baseline"
""" + store


def redis_store(url, prefix):
    """The `[store]` section of a Carrel on the Redis at `url`, its keys under `{prefix}`."""
    return f"""[store]
kind = "redis"
redis_url = "{url}"
redis_prefix = "{prefix}"
"""


def redis_cli(url, *args, commands=None):
    """Runs `redis-cli -u url args...`; with `commands` (lists of words), sends them all, one a
    line, through that one client. Returns the replies, one a line (raw: no type prefixes)."""
    stdin = None if commands is None else "".join(" ".join(c) + "\n" for c in commands)
    done = subprocess.run(["redis-cli", "-u", url, *args], input=stdin, capture_output=True,
                          text=True)
    if done.returncode != 0 or done.stdout.startswith(("ERR", "NOAUTH", "WRONGPASS")):
        raise SystemExit(f"redis-cli {' '.join(args)} failed: {done.stderr or done.stdout}".strip())
    return done.stdout.splitlines()


def check_redis(url):
    """Stops the run early unless `redis-cli` is installed and reaches Redis at `url`."""
    if not shutil.which("redis-cli"):
        raise SystemExit("--store redis needs redis-cli (Debian: apt-get install redis-tools)")
    if redis_cli(url, "PING") != ["PONG"]:
        raise SystemExit(f"no Redis answers at {url}")


def redis_server_pid(url):
    """The pid of the Redis server when it runs on this machine (its CPU time is then measured
    too), else None."""
    info = dict(line.split(":", 1) for line in redis_cli(url, "INFO", "server") if ":" in line)
    pid = info.get("process_id", "").strip()
    try:
        comm = Path(f"/proc/{pid}/comm").read_text() if pid.isdigit() else ""
    except OSError:
        return None
    return int(pid) if comm.startswith("redis") else None


def redis_keys(url, pattern):
    """The keys matching `pattern` (a Redis glob: braces are plain characters)."""
    return redis_cli(url, "--scan", "--pattern", pattern)


def counter_keys(url, prefix):
    """The quota counters of this run: their hash tag is `{prefix:<institution>}`."""
    return redis_keys(url, f"{{{prefix}:*")


def run_keys(url, prefix):
    """Every key of this run: the streams and batch ids (hash tag `{prefix}`) and the counters."""
    return redis_keys(url, f"{{{prefix}}}*") + counter_keys(url, prefix)


def delete_redis_keys(url, prefix):
    """Deletes this run's keys (and no others), 500 a command; returns how many it deleted."""
    keys = run_keys(url, prefix)
    redis_cli(url, commands=[["DEL", *keys[i:i + 500]] for i in range(0, len(keys), 500)])
    return len(keys)


def memory_usage(url, keys):
    """Bytes each key takes in Redis, counting every element (`SAMPLES 0`); 0 for a missing key."""
    replies = redis_cli(url, commands=[["MEMORY", "USAGE", k, "SAMPLES", "0"] for k in keys])
    return [int(r) if r.isdigit() else 0 for r in replies]


def redis_memory(url, prefix, requests):
    """What the run left in Redis, measured once Carrel has sent its last usage batch (it sends
    one every 20 ms): the usage stream per request served, the seen-batch ids, the control log
    and the quota counters."""
    usage, log = f"{{{prefix}}}:usage", f"{{{prefix}}}:log"
    batches = -1
    for _ in range(50):
        time.sleep(0.2)
        now = int(redis_cli(url, "XLEN", usage)[0])
        if now == batches:
            break
        batches = now
    seen = redis_keys(url, f"{{{prefix}}}:usage-seen:*")
    counters = counter_keys(url, prefix)
    usage_bytes, log_bytes = memory_usage(url, [usage, log])
    return {"prefix": prefix, "requests": requests, "batches": batches,
            "usage_bytes": usage_bytes, "log_bytes": log_bytes,
            "seen_keys": len(seen), "seen_bytes": sum(memory_usage(url, seen)) if seen else 0,
            "counter_keys": len(counters),
            "counter_bytes": sum(memory_usage(url, counters)) if counters else 0}


def redis_memory_lines(m):
    """The memory measures as Markdown bullets."""
    per_record = m["usage_bytes"] / max(m["requests"], 1)
    with_seen = (m["usage_bytes"] + m["seen_bytes"]) / max(m["requests"], 1)
    p = m["prefix"]
    return [
        f"- **Redis bytes per usage record: {per_record:.1f}** (`MEMORY USAGE {{{p}}}:usage "
        f"SAMPLES 0` = {m['usage_bytes']} bytes over the {m['requests']} requests the `redis` "
        f"target served, warm-up included, in {m['batches']} stream entries: "
        f"{m['requests'] / max(m['batches'], 1):.0f} records a batch).",
        f"- With the {m['seen_keys']} `usage-seen` keys (one a batch, kept 30 days): "
        f"{m['seen_bytes']} bytes more, {with_seen:.1f} bytes per usage record.",
        f"- `MEMORY USAGE {{{p}}}:log SAMPLES 0` (the control log: the catalog and the admin "
        f"writes that set up the key and limits): {m['log_bytes']} bytes.",
        f"- The {m['counter_keys']} quota counter keys (`{{{p}:<institution>}}:…`, one a level "
        f"in use; they do not grow with requests): {m['counter_bytes']} bytes.",
    ]


def redis_table(results, scenarios):
    """Markdown rows comparing Carrel on the Redis store with Carrel embedded, same run."""
    lines = ["| scenario | embedded req/s | redis req/s | redis/embedded req/s | embedded p50 µs "
             "| redis p50 µs | embedded p99 µs | redis p99 µs | embedded CPU µs/req "
             "| redis CPU µs/req | Redis server CPU µs/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, *_ in scenarios:
        e, r = (results[(scenario, t)] for t in ("carrel", "redis"))
        server = f"{r['redis_cpu_us']:.1f}" if "redis_cpu_us" in r else "n/a"
        lines.append(
            f"| {scenario} | {e['rps']:.0f} | {r['rps']:.0f} | {r['rps'] / e['rps']:.2f} | "
            f"{e['p50_us']:.0f} | {r['p50_us']:.0f} | {e['p99_us']:.0f} | {r['p99_us']:.0f} | "
            f"{e['cpu_us']:.1f} | {r['cpu_us']:.1f} | {server} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15, help="seconds per target and scenario")
    ap.add_argument("--out", help="write a Markdown report here")
    ap.add_argument("--only", help="comma-separated scenario names to run (default: all)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds per scenario; the report shows each target's median")
    ap.add_argument("--baseline", help="another `carrel` binary (an earlier build) to run as "
                    "target `baseline` beside this one, for before/after numbers from one run")
    ap.add_argument("--unsigned", action="store_true",
                    help="also run the same Carrel with `signing.enabled = false` as target "
                    "`unsigned` (same limits), to show what signing responses costs")
    ap.add_argument("--carrel", default=str(RELEASE / "carrel"),
                    help="the `carrel` binary to measure (default: %(default)s)")
    ap.add_argument("--mock-upstream", default=str(RELEASE / "mock-upstream"),
                    help="the `mock-upstream` binary (default: %(default)s)")
    ap.add_argument("--store", choices=["embedded", "redis"], default="embedded",
                    help="`redis`: also run the same Carrel on the Redis store as target `redis` "
                    "(same limits, a fresh key prefix), report it against embedded and measure "
                    "the Redis memory a usage record takes; the run's keys are deleted at the "
                    "end (default: %(default)s, Carrel embedded only)")
    ap.add_argument("--redis-url", default=REDIS_URL,
                    help="the Redis of `--store redis` (default: %(default)s)")
    ap.add_argument("--carrel-load", default=str(RELEASE / "carrel-load"),
                    help="the `carrel-load` binary (default: %(default)s)")
    ap.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                    help="after the scenarios, drive Carrel with chat at concurrency 64 for "
                    "SECONDS, reading its resident memory every 10 s (issue 9: 600, flat ±10%%)")
    ap.add_argument("--open-streams", type=int, default=0, metavar="N",
                    help="after the scenarios, open N slow streams at once through nginx and "
                    "Carrel and measure each one's memory with them open (issue 9: 10000)")
    args = ap.parse_args()
    # Each open stream is a client and an upstream connection in the proxy.
    fds = raise_fd_limit(max(65536, 3 * args.open_streams + 1024))
    if args.open_streams and 2 * args.open_streams + 512 > fds:
        raise SystemExit(f"--open-streams {args.open_streams} needs "
                         f"{2 * args.open_streams + 512} files per process; the limit is {fds}")

    procs = []
    work = Path(tempfile.mkdtemp(prefix="carrel-bench-"))
    prefix = None
    try:
        mock, line = start([args.mock_upstream])
        procs.append(mock)
        mock_addr = line.split("http://", 1)[1]

        cfg = work / "carrel.toml"
        cfg.write_text(carrel_config(mock_addr))
        carrel, carrel_url, key = start_carrel(Path(args.carrel), cfg, work / "data")
        procs.append(carrel)
        baseline = None
        if args.baseline:
            # With the same limits as this build (every build since issue 4 knows them), so
            # that before and after do the same work.
            baseline, baseline_url, baseline_key = start_carrel(
                Path(args.baseline), cfg, work / "baseline-data")
            procs.append(baseline)
        unsigned = None
        if args.unsigned:
            unsigned, unsigned_url, unsigned_key = start_carrel(
                Path(args.carrel), cfg, work / "unsigned-data",
                env={"CARREL__SIGNING__ENABLED": "false"})
            procs.append(unsigned)
        on_redis, redis_pid = None, None
        if args.store == "redis":
            check_redis(args.redis_url)
            redis_pid = redis_server_pid(args.redis_url)
            prefix = f"bench-{secrets.token_hex(6)}"
            redis_cfg = work / "carrel-redis.toml"
            redis_cfg.write_text(carrel_config(mock_addr, redis_store(args.redis_url, prefix)))
            on_redis, redis_url, redis_key = start_carrel(
                Path(args.carrel), redis_cfg, work / "redis-data",
                env={"CARREL_PEPPER": PEPPER}, log=work / "carrel-redis.log")
            procs.append(on_redis)

        nginx_port = free_port()
        (work / "nginx.conf").write_text(nginx_conf(work, nginx_port, mock_addr))
        nginx = subprocess.Popen([nginx_bin(), "-p", str(work), "-c", str(work / "nginx.conf"),
                                  "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        procs.append(nginx)
        wait_http(f"http://127.0.0.1:{nginx_port}/v1/models")

        targets = [
            ("direct", f"http://{mock_addr}", None, None),
            ("nginx", f"http://127.0.0.1:{nginx_port}", None, nginx.pid),
            ("carrel", carrel_url, key, carrel.pid),
        ]
        if baseline:
            targets.append(("baseline", baseline_url, baseline_key, baseline.pid))
        if unsigned:
            targets.append(("unsigned", unsigned_url, unsigned_key, unsigned.pid))
        if on_redis:
            targets.append(("redis", redis_url, redis_key, on_redis.pid))
        # Warm every path (connection pools, caches) before measuring.
        warm_up = {name: oha(base + CHAT_PATH, 8, CHAT, 2, token)
                   for name, base, token, _ in targets}

        runs = {}
        scenarios = [s for s in SCENARIOS if not args.only or s[0] in args.only.split(",")]
        for scenario, conc, body, path, tool in scenarios:
            for rnd in range(args.rounds):
                # Alternate the order each round so no target always runs first.
                order = targets if rnd % 2 == 0 else list(reversed(targets))
                for name, base, token, pid in order:
                    before = cpu_seconds(pid) if pid else 0.0
                    # The Redis server works for the `redis` target only: its CPU is charged there.
                    server_pid = redis_pid if name == "redis" else None
                    server_before = cpu_seconds(server_pid) if server_pid else 0.0
                    if tool == "oha":
                        r = oha(base + path, conc, body, args.duration, token)
                    else:
                        r = carrel_load(args.carrel_load, "stream", base + path, body, conc,
                                        args.duration, token)
                    if pid:
                        r["cpu_us"] = (cpu_seconds(pid) - before) * 1e6 / max(r["requests"], 1)
                        # Resident memory as the load ends (nginx: master and workers).
                        r["rss_mib"] = rss_kib(pid) / 1024
                    if server_pid:
                        r["redis_cpu_us"] = ((cpu_seconds(server_pid) - server_before) * 1e6
                                             / max(r["requests"], 1))
                    runs.setdefault((scenario, name), []).append(r)
                    cpu = (f"  proxy CPU {r['cpu_us']:6.1f} µs/req  RSS {r['rss_mib']:5.1f} MiB"
                           if pid else "")
                    if server_pid:
                        cpu += f"  Redis CPU {r['redis_cpu_us']:6.1f} µs/req"
                    print(f"{scenario:12} {name:7} {r['rps']:10.0f} req/s  p50 {r['p50_us']:8.0f} µs"
                          f"  p99 {r['p99_us']:8.0f} µs{cpu}  non-2xx {r['non2xx']}"
                          f"  errors {r['errors']}", flush=True)
        results = {k: {m: median([r[m] for r in v]) for m in v[0]} for k, v in runs.items()}

        lines = ["| scenario | direct req/s | nginx req/s | Carrel req/s | Carrel/nginx req/s "
                 "| nginx p50 µs | Carrel p50 µs | Carrel−nginx p50 µs | nginx p99 µs | Carrel p99 µs "
                 "| nginx CPU µs/req | Carrel CPU µs/req | nginx RSS MiB | Carrel RSS MiB |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for scenario, *_ in scenarios:
            d, n, c = (results[(scenario, t)] for t in ("direct", "nginx", "carrel"))
            lines.append(
                f"| {scenario} | {d['rps']:.0f} | {n['rps']:.0f} | {c['rps']:.0f} | "
                f"{c['rps'] / n['rps']:.2f} | {n['p50_us']:.0f} | {c['p50_us']:.0f} | "
                f"{c['p50_us'] - n['p50_us']:+.0f} | {n['p99_us']:.0f} | {c['p99_us']:.0f} | "
                f"{n['cpu_us']:.1f} | {c['cpu_us']:.1f} | {n['rss_mib']:.1f} | "
                f"{c['rss_mib']:.1f} |")
        lines += ["", "`stream ttfb` is measured by `carrel-load`: req/s is streams/s, p50 and p99 "
                  "are the time to the first event."]
        if baseline:
            lines += ["", "| scenario | baseline req/s | Carrel req/s | Carrel/baseline req/s "
                      "| baseline p50 µs | Carrel p50 µs | baseline CPU µs/req | Carrel CPU µs/req |",
                      "|---|---|---|---|---|---|---|---|"]
            for scenario, *_ in scenarios:
                b, c = (results[(scenario, t)] for t in ("baseline", "carrel"))
                lines.append(
                    f"| {scenario} | {b['rps']:.0f} | {c['rps']:.0f} | {c['rps'] / b['rps']:.2f} | "
                    f"{b['p50_us']:.0f} | {c['p50_us']:.0f} | {b['cpu_us']:.1f} | "
                    f"{c['cpu_us']:.1f} |")
        if unsigned:
            lines += ["", "| scenario | unsigned req/s | signed req/s | signed/unsigned req/s "
                      "| unsigned/nginx req/s | signed/nginx req/s | unsigned p50 µs "
                      "| signed p50 µs | unsigned CPU µs/req | signed CPU µs/req |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for scenario, *_ in scenarios:
                u, c, n = (results[(scenario, t)] for t in ("unsigned", "carrel", "nginx"))
                lines.append(
                    f"| {scenario} | {u['rps']:.0f} | {c['rps']:.0f} | {c['rps'] / u['rps']:.2f} | "
                    f"{u['rps'] / n['rps']:.2f} | {c['rps'] / n['rps']:.2f} | "
                    f"{u['p50_us']:.0f} | {c['p50_us']:.0f} | {u['cpu_us']:.1f} | "
                    f"{c['cpu_us']:.1f} |")
        names = [s for s, *_ in scenarios]
        if "cached c=64" in names and "chat c=64" in names:
            hit, miss = results[("cached c=64", "carrel")], results[("chat c=64", "carrel")]
            lines += ["", f"Cache-hit path: Carrel answers {hit['rps']:.0f} req/s from its cache "
                      f"against {miss['rps']:.0f} req/s asking the provider, "
                      f"{hit['rps'] / miss['rps']:.2f}× (CPU {hit['cpu_us']:.1f} against "
                      f"{miss['cpu_us']:.1f} µs/req)."]
        if args.open_streams:
            proxies = [t for t in targets if t[0] in ("nginx", "carrel")]
            lines += ["", f"{args.open_streams} slow streams open at once (the mock sends a "
                      "word a second), memory of each proxy:", ""]
            lines += open_streams_lines(open_streams(args.carrel_load, proxies,
                                                     args.open_streams))
        if args.soak:
            lines += [""] + soak(targets, args.soak)
        peak = {name: rss_kib(pid, "VmHWM") / 1024 for name, _, _, pid in targets if pid}
        lines += ["", "Peak resident memory over the whole run (VmHWM): " + ", ".join(
            f"{name} {mib:.1f} MiB" for name, mib in peak.items()) + "."]
        memory = None
        if on_redis:
            lines += [""] + redis_table(results, scenarios)
            served = warm_up["redis"]["requests"] + sum(
                r["requests"] for (_, name), v in runs.items() if name == "redis" for r in v)
            memory = redis_memory(args.redis_url, prefix, served)
        table = "\n".join(lines)
        print()
        print(table)
        if memory:
            print()
            print("\n".join(redis_memory_lines(memory)))
        print()
        print(f"machine: {machine()}")
        failures = sum(r["non2xx"] + r["errors"] for v in runs.values() for r in v)
        print(f"non-2xx responses and transport errors across all runs: {failures}")
        if args.out:
            Path(args.out).write_text(report(table, args.duration, args.rounds, failures,
                                             memory, args.redis_url))
            print(f"wrote {args.out}")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if prefix:
            # After the replica stopped, so that nothing writes under the prefix any more.
            print(f"deleted the run's {delete_redis_keys(args.redis_url, prefix)} Redis keys "
                  f"({{{prefix}}}* and {{{prefix}:*)")
        shutil.rmtree(work, ignore_errors=True)


def report(table, duration, rounds, failures, memory=None, redis_url=REDIS_URL):
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""# Benchmark results

Produced by `deploy/bench/run.sh --out deploy/bench/RESULTS.md` on {stamp}.

- Machine: {machine()}.
- Everything shares the machine's cores: the mock upstream, nginx ({os.cpu_count()} workers, keep-alive pool to
  the mock, buffering off), Carrel (release build, API-key auth on, {os.cpu_count()} worker threads: `server.workers` defaults to one per core) and oha.
- Each target runs {duration} s per scenario, back to back, in {rounds} rounds whose order alternates,
  after a 2 s warm-up of every path; the table shows each target's median over the rounds.
- CPU µs/req is the proxy's own user + system CPU time (nginx: master and workers) divided by the
  requests it served: the steadiest measure on a shared machine, where req/s moves with whatever
  else runs.
- `chat` posts a small chat completion and gets ~330 bytes of JSON; `stream` gets 7 SSE events.
- req/s counts only 2xx answers; non-2xx responses and transport errors across all runs: {failures}.{redis_notes(memory, redis_url)}

{table}{redis_section(memory)}

Targets for issue 2: Carrel ≥ 0.8× nginx req/s at concurrency 64; at concurrency 1, Carrel's p50
≤ nginx's p50 + 50 µs.{redis_target(memory)}
"""


def redis_notes(memory, redis_url):
    """The report's bullet on the `redis` target, or nothing without `--store redis`."""
    if not memory:
        return ""
    return f"""
- `--store redis`: target `redis` is a second Carrel, the same binary with the same limits, on
  `[store] kind = "redis"` ({redis_url}, prefix `{memory['prefix']}`, its own data dir); it runs
  in the same rounds as the others, and "embedded" in its table is target `carrel`. Redis server
  CPU µs/req is the whole redis-server's CPU time while that target ran (anything else using
  that Redis counts too)."""


def redis_section(memory):
    """The report's Redis memory measures, or nothing without `--store redis`."""
    if not memory:
        return ""
    return "\n\nRedis memory after the run:\n\n" + "\n".join(redis_memory_lines(memory))


def redis_target(memory):
    """The Redis store's target, or nothing without `--store redis`."""
    if not memory:
        return ""
    return ("\n\nTarget for the Redis store: Redis mode ≥ 0.6× embedded req/s at concurrency 64, "
            "same run.")


if __name__ == "__main__":
    sys.exit(main())
