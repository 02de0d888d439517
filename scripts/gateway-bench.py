#!/usr/bin/env python3
"""HTTP through seaport's gateway, beside a --map port and direct, on loopback.

One nginx (Debian's) serves a small page and 1 MiB and 100 MiB files; one
registry, one service in front of nginx, and one proxy serving the role on a
--map port and through --gateway. Measured in one run, the three paths
alternating round by round (medians of --rounds rounds), with the release
binaries:

1. `wrk --latency` (keep-alive, CONNS connections, one thread) for DURATION
   seconds on the small page: requests/s, p50 and p99;
2. `curl` fetching the 1 MiB and the 100 MiB file: seconds, and whether the
   body is whole (sha256 against the file).

Prints a markdown table on stdout (progress on stderr). Needs nginx, wrk,
curl and python3.

    scripts/gateway-bench.py [--rounds N] [--duration S] [--conns N] [--bin DIR]
"""

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_tcp(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def wait_line(path, needle, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path, errors="replace") as f:
            if needle in f.read():
                return
        time.sleep(0.05)
    raise SystemExit(f"{path}: no {needle!r} within {timeout}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    args = ap.parse_args()
    b = lambda name: os.path.join(args.bin, name)
    work = tempfile.mkdtemp(prefix="seaport-gateway-bench-")
    procs = []

    def start(cmd, name):
        out = open(os.path.join(work, name + ".log"), "w")
        env = dict(os.environ, RUST_LOG="info")
        for key in ["SEAPORT_REGISTRY", "SEAPORT_SEED", "SEAPORT_BOOTSTRAP", "SEAPORT_REGISTRY_SEED"]:
            env.pop(key, None)
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(p)
        return os.path.join(work, name + ".log")

    try:
        # nginx and its files.
        www = os.path.join(work, "www")
        os.makedirs(os.path.join(work, "logs"))
        os.makedirs(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("<html><body>" + "seaport " * 64 + "</body></html>\n")
        digests = {}
        for name, size in [("1m.bin", 1 << 20), ("100m.bin", 100 << 20)]:
            data = os.urandom(size)
            with open(os.path.join(www, name), "wb") as f:
                f.write(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        web = free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""pid {work}/nginx.pid; error_log {work}/logs/error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{web}; root {www}; }} }}
""")
        procs.append(subprocess.Popen(["nginx", "-p", work, "-c", conf, "-g", "daemon off; master_process off;"]))
        wait_tcp(web)

        # seaport: registry, service, proxy with a port and the gateway.
        seed = json.loads(subprocess.check_output([b("seaport-seed"), "--json"]))
        reg_port = free_port()
        reg_log = start([b("seaport-registry"), "--listen", f"127.0.0.1:{reg_port}", "--no-dht",
                         "--seed", seed["seed"]], "registry")
        wait_line(reg_log, "Registry listening")
        target = f"{seed['pubkey']}@127.0.0.1:{reg_port}"
        svc_log = start([b("seaport-service"), target, "-p", str(web), "-r", "web@1.0.0"], "service")
        wait_line(svc_log, "registered service")
        mapped, gateway = free_port(), free_port()
        proxy_log = start([b("seaport-proxy"), target, "--map", f"web@1={mapped}",
                           "--gateway", f"127.0.0.1:{gateway}"], "proxy")
        wait_line(proxy_log, "proxy from")
        wait_line(proxy_log, "HTTP gateway on")

        systems = [
            ("direct", f"http://127.0.0.1:{web}/"),
            ("--map port", f"http://127.0.0.1:{mapped}/"),
            ("gateway", f"http://127.0.0.1:{gateway}/role/web@1/"),
        ]
        # Warm up: links, watches, the gateway's kept connections.
        for _, base in systems:
            subprocess.run(["curl", "-sf", "-o", "/dev/null", base], check=True)

        rows = {name: {"rps": [], "p50": [], "p99": [], "1m.bin": [], "100m.bin": [], "whole": True}
                for name, _ in systems}
        for round_ in range(args.rounds):
            for name, base in systems:
                out = subprocess.run(["wrk", "-t1", f"-c{args.conns}", f"-d{args.duration}s", "--latency", base],
                                     capture_output=True, text=True, check=True).stdout
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                p = {pct: ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1)) for pct in ["50", "99"]}
                rows[name]["rps"].append(rps)
                rows[name]["p50"].append(p["50"])
                rows[name]["p99"].append(p["99"])
                for file in ["1m.bin", "100m.bin"]:
                    started = time.perf_counter()
                    body = subprocess.run(["curl", "-sf", base + file], capture_output=True, check=True).stdout
                    rows[name][file].append(time.perf_counter() - started)
                    rows[name]["whole"] &= hashlib.sha256(body).hexdigest() == digests[file]
                log(f"round {round_ + 1} {name}: {rps:.0f} req/s, p50 {p['50']:.3f} ms, p99 {p['99']:.3f} ms")

        med = statistics.median
        mapped_p50 = med(rows["--map port"]["p50"])
        print(f"| path | requests/s | p50 | p99 | p50 vs --map | 1 MiB | 100 MiB | bodies whole |")
        print("|---|---|---|---|---|---|---|---|")
        for name, _ in systems:
            r = rows[name]
            print(f"| {name} | {med(r['rps']):,.0f} | {med(r['p50']):.3f} ms | {med(r['p99']):.3f} ms | "
                  f"{med(r['p50']) / mapped_p50:.2f}x | {med(r['1m.bin']) * 1000:.1f} ms | "
                  f"{med(r['100m.bin']):.2f} s | {'yes' if r['whole'] else 'NO'} |")
        print(f"\n{args.rounds} rounds alternating, wrk -t1 -c{args.conns} -d{args.duration}s on a "
              f"{os.path.getsize(os.path.join(www, 'index.html'))}-byte page; medians.")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def ms(text):
    """wrk's latency ("812.00us", "1.20ms", "2.01s") in milliseconds."""
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


if __name__ == "__main__":
    main()
