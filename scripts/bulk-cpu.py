#!/usr/bin/env python3
"""Where a bulk transfer's CPU goes: moves BYTES (default 2 GiB) down (or,
with DIRECTION=up, up) through a direct connection, the bench's plain
two-hop relay and seaport (service + proxy), ROUNDS times in turn, and
prints for each transfer its rate, the machine's idle share, and the CPU
seconds each process on its path used (from /proc). A process whose CPU
equals the transfer's time is what limits it.

    cargo build --release -p seaport-bench -p seaport-proxy -p seaport-service -p seaport-registry
    scripts/bulk-cpu.py target/release [BYTES] [ROUNDS]
    DIRECTION=up ONLY=seaport scripts/bulk-cpu.py target/release 1073741824 3

TARGET may be another build's directory (a worktree's target/release), to
compare two builds in turn. Loopback only; every process it starts is
killed at the end."""
import os, socket, struct, subprocess, sys, time, re

TARGET = sys.argv[1]          # target/release dir
BYTES = int(sys.argv[2]) if len(sys.argv) > 2 else 2 << 30
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
UP = os.environ.get("DIRECTION") == "up"
bench = os.path.join(TARGET, "seaport-bench")
HZ = os.sysconf("SC_CLK_TCK")
procs = []

def start(name, argv, wait=None):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append((name, p))
    line = ""
    if wait:
        while wait not in line:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"{name} ended")
    return p, line.strip()

def cpu(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total / HZ

def idle():
    f = open("/proc/stat").readline().split()[1:]
    vals = list(map(int, f))
    return (vals[3] + vals[4]) / HZ, sum(vals) / HZ

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

try:
    be, l = start("backend", [bench, "backend"], "listening"); backend = l.rsplit(" ", 1)[1]
    h2, l = start("hop2", [bench, "relay", backend], "listening"); hop2 = l.rsplit(" ", 1)[1]
    h1, l = start("hop1", [bench, "relay", hop2], "listening"); relay = l.rsplit(" ", 1)[1]
    rport = free_port()
    reg, l = start("registry", [os.path.join(TARGET, "seaport-registry"), "--seed", "11" * 32, "--listen", f"127.0.0.1:{rport}", "--no-dht"], "Connect with pubkey")
    key = l.rsplit(" ", 1)[1]
    target = f"{key}@127.0.0.1:{rport}"
    bport = backend.rsplit(":", 1)[1]
    svc, _ = start("service", [os.path.join(TARGET, "seaport-service"), target, "-p", bport, "-r", "bench@1.0.0", "--listen", "127.0.0.1:0"], "registered service")
    pport = free_port()
    px, _ = start("proxy", [os.path.join(TARGET, "seaport-proxy"), target, "-p", str(pport), "-r", "bench"], "proxy from")
    paths = {"direct": backend, "relay": relay, "seaport": f"127.0.0.1:{pport}"}
    if os.environ.get("ONLY"):
        paths = {k: v for k, v in paths.items() if k == os.environ["ONLY"]}
    if os.environ.get("PIDS"):
        # For `perf record -p`: the service's and the proxy's pids.
        open(os.environ["PIDS"], "w").write(f"{svc.pid} {px.pid}\n")
    watch = {"direct": [("backend", be)], "relay": [("backend", be), ("hop1", h1), ("hop2", h2)],
             "seaport": [("backend", be), ("proxy", px), ("service", svc)]}
    buf = bytearray(1 << 20); mv = memoryview(buf)
    results = {k: [] for k in paths}
    for r in range(ROUNDS):
        for name, addr in paths.items():
            host, port = addr.rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            before = {n: cpu(p.pid) for n, p in watch[name]}
            me0 = os.times(); i0 = idle(); t0 = time.perf_counter()
            if UP:
                s.sendall(b"S")
                got = 0
                while got < BYTES:
                    got += s.send(mv[:min(len(mv), BYTES - got)])
                s.shutdown(socket.SHUT_WR)
                count = b""
                while len(count) < 8:
                    more = s.recv(8 - len(count))
                    if not more: break
                    count += more
                assert struct.unpack("<Q", count)[0] == BYTES, count
            else:
                s.sendall(b"D" + struct.pack("<Q", BYTES))
                got = 0
                while got < BYTES:
                    n = s.recv_into(mv)
                    if n == 0: break
                    got += n
            dt = time.perf_counter() - t0; i1 = idle(); me1 = os.times()
            s.close()
            after = {n: cpu(p.pid) for n, p in watch[name]}
            used = {n: after[n] - before[n] for n in before}
            used["client"] = (me1.user + me1.system) - (me0.user + me0.system)
            idle_frac = (i1[0] - i0[0]) / max(i1[1] - i0[1], 1e-9)
            results[name].append((got / dt / 1e6, dt, idle_frac, used))
            print(f"{name:8} {got/dt/1e6:7.0f} MB/s  {dt:5.2f}s  idle {idle_frac*100:4.1f}%  " +
                  "  ".join(f"{n} {v:5.2f}s" for n, v in used.items()), flush=True)
finally:
    for _, p in procs:
        p.kill()
