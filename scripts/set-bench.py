#!/usr/bin/env python3
"""What a registry set costs and how fast it covers a death, on loopback.

Measured side by side in one run, with the release binaries:

1. failover: a set of three registries (static list), a service and a proxy
   connected to all three; one registry is killed (SIGKILL) and at that
   moment (a) a new proxy is started, (b) a new service instance is started
   for a role the running proxy serves. Reported: time from the kill to the
   first successful HTTP request each made possible (process start
   included), median of --rounds rounds;
2. cost to a registry: RSS and CPU time of one registry holding N services,
   alone and as one member of a set of three (each member holds all N);
3. cost to a client: RSS of a service and of a proxy following one registry
   and following three, and their sessions.

Prints a markdown table on stdout (progress on stderr). Needs python3 only.

    scripts/set-bench.py [--services N] [--rounds N] [--bin DIR]
"""

import argparse
import http.server
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A process whose stdout and stderr are collected in the background."""

    def __init__(self, bin_dir, name, args, env=None):
        full_env = dict(os.environ, RUST_LOG="info", **(env or {}))
        self.p = subprocess.Popen(
            [os.path.join(bin_dir, name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
        )
        self.out, self.err = [], []
        for stream, sink in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(l) for l in s], daemon=True).start()

    def wait_out(self, needle, timeout=20, count=1):
        deadline = time.monotonic() + timeout
        while sum(needle in l for l in self.out) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r} x{count}: {self.out[-5:]} {self.err[-5:]}")
            time.sleep(0.01)

    def count_err(self, needle):
        return sum(needle in l for l in self.err)

    def rss_kib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self):
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Body(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def backend():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Body)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def get_ok(port, timeout=1.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def until_ok(port, limit=30):
    deadline = time.monotonic() + limit
    while not get_ok(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} never answered")
        time.sleep(0.005)


class Set:
    def __init__(self, bin_dir, n):
        self.bin_dir = bin_dir
        seed = subprocess.run([os.path.join(bin_dir, "seaport-seed"), "--json"], capture_output=True, text=True)
        import json

        doc = json.loads(seed.stdout)
        self.seed, self.key = doc["seed"], doc["pubkey"]
        self.listens = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        self.members = [self.start(l) for l in self.listens]

    def start(self, listen):
        p = Proc(self.bin_dir, "seaport-registry", ["--listen", listen, "--no-dht"], {"SEAPORT_REGISTRY_SEED": self.seed})
        p.wait_out("Registry listening")
        return p

    def target(self):
        return f"{self.key}@{','.join(self.listens)}"

    def stop(self):
        for m in self.members:
            m.kill()


def failover(bin_dir, rounds):
    """Kill to first success: a new proxy, and a new service instance."""
    new_proxy, new_service = [], []
    for r in range(rounds):
        s = Set(bin_dir, 3)
        t = s.target()
        procs = []
        try:
            web = backend()
            svc = Proc(bin_dir, "seaport-service", [t, "-p", str(web), "-r", "web@1.0.0"])
            procs.append(svc)
            svc.wait_out("registered service")
            port = free_port()
            other_port = free_port()
            proxy = Proc(bin_dir, "seaport-proxy", [t, "-p", str(port), "-r", "web", "--map", f"late@1={other_port}"])
            procs.append(proxy)
            proxy.wait_out("connected to registry at", count=3)
            until_ok(port)
            killed = time.monotonic()
            s.members[r % 3].kill()
            late = Proc(bin_dir, "seaport-service", [t, "-p", str(web), "-r", "late@1.0.0"])
            fresh_port = free_port()
            fresh = Proc(bin_dir, "seaport-proxy", [t, "-p", str(fresh_port), "-r", "web"])
            procs += [late, fresh]
            done = {}
            while len(done) < 2:
                now = time.monotonic()
                if "proxy" not in done and get_ok(fresh_port, 0.5):
                    done["proxy"] = now - killed
                if "service" not in done and get_ok(other_port, 0.5):
                    done["service"] = now - killed
                if now - killed > 30:
                    raise RuntimeError(f"no success 30 s after the kill: {done}")
                time.sleep(0.002)
            new_proxy.append(done["proxy"])
            new_service.append(done["service"])
            log(f"round {r}: new proxy {done['proxy']:.3f} s, new service {done['service']:.3f} s")
        finally:
            for p in procs:
                p.kill()
            s.stop()
    return statistics.median(new_proxy), max(new_proxy), statistics.median(new_service), max(new_service)


def costs(bin_dir, services, members):
    """A registry with `services` services (each in all `members`), and a client's own cost."""
    s = Set(bin_dir, members)
    t = s.target()
    procs = []
    try:
        web = backend()
        base_rss = s.members[0].rss_kib()
        base_cpu = s.members[0].cpu_s()
        started = time.monotonic()
        for i in range(services):
            svc = Proc(bin_dir, "seaport-service", [t, "-p", str(web), "-r", f"s{i}@1.0.0", "--listen", "127.0.0.1:0"])
            procs.append(svc)
        for svc in procs:
            svc.wait_out("registered service", timeout=60)
        deadline = time.monotonic() + 60
        while s.members[0].count_err("registered peer") < services:
            if time.monotonic() > deadline:
                raise RuntimeError("not every service registered with member 0")
            time.sleep(0.05)
        port = free_port()
        proxy = Proc(bin_dir, "seaport-proxy", [t, "-p", str(port), "-r", "s0"])
        procs.append(proxy)
        proxy.wait_out("connected to registry at", count=members)
        until_ok(port)
        # A minute of keepalives, as a registry spends its days.
        time.sleep(20)
        reg_rss = s.members[0].rss_kib()
        reg_cpu = s.members[0].cpu_s() - base_cpu
        elapsed = time.monotonic() - started
        svc_rss = statistics.median(p.rss_kib() for p in procs[:services])
        return {
            "registry RSS per service (KiB)": (reg_rss - base_rss) / services,
            "registry CPU per service per minute (ms)": reg_cpu / services / elapsed * 60 * 1000,
            "service RSS (KiB)": svc_rss,
            "proxy RSS (KiB)": proxy.rss_kib(),
            "sessions per client": members,
        }
    finally:
        for p in procs:
            p.kill()
        s.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin", default=None)
    args = ap.parse_args()
    bin_dir = args.bin or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
    if args.bin is None:
        subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True)

    log("failover …")
    p_med, p_max, s_med, s_max = failover(bin_dir, args.rounds)
    log("cost, one registry …")
    one = costs(bin_dir, args.services, 1)
    log("cost, a set of three …")
    three = costs(bin_dir, args.services, 3)

    print(f"| failover (kill to first success, {args.rounds} rounds) | median | max |")
    print("|---|---|---|")
    print(f"| a proxy started at the kill | {p_med:.3f} s | {p_max:.3f} s |")
    print(f"| a service instance started at the kill, through a running proxy | {s_med:.3f} s | {s_max:.3f} s |")
    print()
    print(f"| cost ({args.services} services) | one registry | set of three (per member) | ratio |")
    print("|---|---|---|---|")
    for k in one:
        a, b = one[k], three[k]
        print(f"| {k} | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
