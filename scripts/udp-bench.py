#!/usr/bin/env python3
"""UDP through seaport, beside direct and rathole's UDP forwarding, on loopback.

Measured in one run, the systems alternating round by round (medians of
--rounds rounds), with the release binaries:

1. `iperf3 -u` at rising rates (1,400-byte datagrams): the loss at each rate,
   and the highest rate with under 1 % lost;
2. datagrams per second at 64 and 1,400 bytes (`iperf3 -u -b 0`, what the
   receiver got);
3. a request/response over UDP (a 64-byte datagram echoed): p50 and p99;
4. with root, WireGuard (`wireguard-go` in two network namespaces) carried
   by each system: an `iperf3` TCP transfer across the tunnel.

seaport runs a registry, services (iperf3's TCP control and UDP data on one
role with --udp-port, an echo with --udp) and one proxy; rathole (if found:
--rathole PATH, or on PATH) a server and a client with its Noise transport,
one service per port and protocol. Prints a markdown table on stdout
(progress on stderr). Needs python3, iperf3, and for row 4 root,
wireguard-go, wireguard-tools and iproute2.

    scripts/udp-bench.py [--rounds N] [--bin DIR] [--rathole PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATES_MBIT = [100, 200, 400, 800, 1600]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    """A port free for TCP and UDP alike, a moment ago."""
    while True:
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()


class Procs:
    """Processes started for one system; all killed on stop()."""

    def __init__(self):
        self.procs = []

    def start(self, args, env=None, netns=None):
        if netns:
            args = ["ip", "netns", "exec", netns] + args
        full = dict(os.environ, RUST_LOG="warn")
        full.update(env or {})
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=full, text=True)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            try:
                p.send_signal(signal.SIGKILL)
                p.wait(5)
            except Exception:
                pass
        self.procs = []


def wait_line(proc, needle, timeout=20):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if needle in line:
            return line
        if time.time() > deadline:
            break
    raise RuntimeError(f"no {needle!r} from {proc.args}")


def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))

    def serve():
        while True:
            data, addr = s.recvfrom(65536)
            s.sendto(data, addr)

    threading.Thread(target=serve, daemon=True).start()


def wait_udp(port, timeout=20):
    """Until a datagram to the echo at `port` comes back."""
    deadline = time.time() + timeout
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(0.3)
    c.connect(("127.0.0.1", port))
    while time.time() < deadline:
        try:
            c.send(b"x")
            c.recv(100)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no echo through port {port}")


def wait_tcp(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


# ---- the systems ----------------------------------------------------------------------------


def direct(procs, backends, wg):
    """No forwarder: the clients reach the backends themselves."""
    return {"iperf": backends["iperf"], "echo": backends["echo"], "wg": wg and ("10.77.1.2", 51820)}


def seaport(bindir):
    def start(procs, backends, wg):
        b = lambda name: os.path.join(bindir, name)  # noqa: E731
        seed = json.loads(subprocess.check_output([b("seaport-seed"), "--json"]))
        reg_port = free_port()
        reg = procs.start([b("seaport-registry"), "--listen", f"127.0.0.1:{reg_port}", "--no-dht"],
                          env={"SEAPORT_REGISTRY_SEED": seed["seed"]})
        wait_line(reg, "Registry listening")
        target = f"{seed['pubkey']}@127.0.0.1:{reg_port}"
        iperf = str(backends["iperf"])
        for args in ([iperf, "--udp-port", iperf, "-r", "iperf@1.0.0"],
                     [str(backends["echo"]), "--udp", "-r", "echo@1.0.0"]):
            svc = procs.start([b("seaport-service"), target, "-p"] + args)
            wait_line(svc, "registered service")
        if wg:
            svc = procs.start([b("seaport-service"), target, "-p", "51820", "--udp", "--host", "10.77.1.2",
                               "-r", "wg@1.0.0"])
            wait_line(svc, "registered service")
        ports = {"iperf": free_port(), "echo": free_port()}
        maps = [f"iperf@1={ports['iperf']}", f"iperf@1={ports['iperf']}/udp", f"echo@1={ports['echo']}/udp"]
        args = [b("seaport-proxy"), target]
        for m in maps:
            args += ["--map", m]
        proxy = procs.start(args)
        for _ in maps:
            wait_line(proxy, "proxy from")
        if wg:
            wg_port = free_port()
            wg_proxy = procs.start([b("seaport-proxy"), target, "--map", f"wg@1={wg_port}/udp", "--bind", "10.77.0.1"])
            wait_line(wg_proxy, "proxy from")
            ports["wg"] = ("10.77.0.1", wg_port)
        return ports

    return start


def rathole(path):
    def start(procs, backends, wg):
        keys = subprocess.check_output([path, "--genkey"], text=True).split()
        private, public = keys[keys.index("Private") + 2], keys[keys.index("Public") + 2]
        control = free_port()
        ports = {"iperf": free_port(), "echo": free_port()}
        services = [("iperf_tcp", "tcp", ports["iperf"], backends["iperf"]),
                    ("iperf_udp", "udp", ports["iperf"], backends["iperf"]),
                    ("echo", "udp", ports["echo"], backends["echo"])]
        if wg:
            ports["wg"] = ("10.77.0.1", free_port())
            services.append(("wg", "udp", ports["wg"][1], "10.77.1.2:51820"))
        transport = 'type = "noise"\n'
        server = f'[server]\nbind_addr = "127.0.0.1:{control}"\n[server.transport]\n{transport}' \
                 f'[server.transport.noise]\nlocal_private_key = "{private}"\n'
        client = f'[client]\nremote_addr = "127.0.0.1:{control}"\n[client.transport]\n{transport}' \
                 f'[client.transport.noise]\nremote_public_key = "{public}"\n'
        for name, kind, port, backend in services:
            bind = f"10.77.0.1:{port}" if name == "wg" else f"127.0.0.1:{port}"
            local = backend if isinstance(backend, str) else f"127.0.0.1:{backend}"
            server += f'[server.services.{name}]\ntype = "{kind}"\ntoken = "t"\nbind_addr = "{bind}"\n'
            client += f'[client.services.{name}]\ntype = "{kind}"\ntoken = "t"\nlocal_addr = "{local}"\n'
        d = tempfile.mkdtemp(prefix="rathole-")
        for name, text in (("server.toml", server), ("client.toml", client)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        procs.start([path, "-s", os.path.join(d, "server.toml")])
        time.sleep(0.3)
        procs.start([path, "-c", os.path.join(d, "client.toml")])
        wait_tcp(ports["iperf"])
        return ports

    return start


# ---- the measures ---------------------------------------------------------------------------


def iperf3(port, *args, host="127.0.0.1", netns=None):
    cmd = ["iperf3", "-c", host, "-p", str(port), "-J"] + list(args)
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    for _ in range(3):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            report = {}
        if "end" in report and "error" not in report:
            return report
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 {args} through {port}: {out.stdout[-400:]} {out.stderr[-400:]}")


def udp_sum(report):
    s = report["end"]["sum"]
    return s


def loss_at(port, mbit):
    s = udp_sum(iperf3(port, "-u", "-b", f"{mbit}M", "-l", "1400", "-t", "2"))
    return s["lost_percent"]


def pps(port, size):
    s = udp_sum(iperf3(port, "-u", "-b", "0", "-l", str(size), "-t", "2"))
    received = s["packets"] - s["lost_packets"]
    return received / s["seconds"]


def request_response(port, n=3000):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(1)
    c.connect(("127.0.0.1", port))
    payload = b"q" * 64
    times = []
    for _ in range(n):
        t = time.perf_counter()
        c.send(payload)
        try:
            c.recv(100)
        except socket.timeout:
            continue
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, n - len(times)


# ---- WireGuard in namespaces ---------------------------------------------------------------


def sh(*args, netns=None, check=True, input=None):
    if netns:
        args = ("ip", "netns", "exec", netns) + args
    return subprocess.run(args, check=check, capture_output=True, text=True, input=input).stdout


class WgLab:
    """Namespaces a (client) and b (server, 10.77.1.2) on veth pairs to this one."""

    NS = ("ubench-a", "ubench-b")

    def __init__(self):
        self.down()
        for i, ns in enumerate(self.NS):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"{ns}h"[-15:], "type", "veth", "peer", "name", f"{ns}n"[-15:])
            sh("ip", "link", "set", f"{ns}n"[-15:], "netns", ns)
            sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", f"{ns}h"[-15:])
            sh("ip", "link", "set", f"{ns}h"[-15:], "up")
            sh("ip", "addr", "add", f"10.77.{i}.2/24", "dev", f"{ns}n"[-15:], netns=ns)
            sh("ip", "link", "set", f"{ns}n"[-15:], "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
            sh("ip", "route", "add", "default", "via", f"10.77.{i}.1", netns=ns)
        self.keys = []
        for _ in range(2):
            private = sh("wg", "genkey").strip()
            self.keys.append((private, sh("wg", "pubkey", input=private).strip()))
        self.daemons = []

    def tunnel(self, endpoint, forward=False):
        """(Re)makes the tunnel with the client's endpoint at `endpoint`;
        `forward`: this namespace routes between the two (direct)."""
        self.stop_tunnel()
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            was = f.read().strip()
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1" if forward else was)
        try:
            return self._tunnel(endpoint)
        finally:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write(was)

    def _tunnel(self, endpoint):
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        for i in (1, 0):
            ns, dev = self.NS[i], f"ubw{i}"
            self.daemons.append(subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", dev], env=env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for _ in range(100):
                if subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", dev],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            with tempfile.NamedTemporaryFile("w", delete=False) as f:
                f.write(self.keys[i][0])
            peer = self.keys[1 - i][1]
            if i == 1:
                sh("wg", "set", dev, "private-key", f.name, "listen-port", "51820", "peer", peer,
                   "allowed-ips", "10.99.0.1/32", netns=ns)
            else:
                sh("wg", "set", dev, "private-key", f.name, "peer", peer, "allowed-ips", "10.99.0.2/32",
                   "endpoint", f"{endpoint[0]}:{endpoint[1]}", "persistent-keepalive", "1", netns=ns)
            os.unlink(f.name)
            sh("ip", "addr", "add", f"10.99.0.{i + 1}/24", "dev", dev, netns=ns)
            sh("ip", "link", "set", dev, "up", netns=ns)
        sh("ping", "-c", "3", "-W", "5", "10.99.0.2", netns=self.NS[0])
        server = subprocess.Popen(["ip", "netns", "exec", self.NS[1], "iperf3", "-s", "-1", "-B", "10.99.0.2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        try:
            report = iperf3(5201, "-t", "3", host="10.99.0.2", netns=self.NS[0])
        finally:
            server.kill()
            server.wait()
        return report["end"]["sum_received"]["bits_per_second"] / 1e6

    def stop_tunnel(self):
        for d in self.daemons:
            d.kill()
            d.wait()
        self.daemons = []
        time.sleep(0.2)

    def down(self):
        for ns in self.NS:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid])
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{ns}h"[-15:]], capture_output=True)


# ---- the run --------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--rathole", default=shutil.which("rathole"))
    args = ap.parse_args()
    if not shutil.which("iperf3"):
        sys.exit("needs iperf3 (Debian iperf3)")

    backends = {"iperf": free_port(), "echo": free_port()}
    shared = Procs()
    shared.start(["iperf3", "-s", "-p", str(backends["iperf"])])
    udp_echo(backends["echo"])
    wait_tcp(backends["iperf"])

    lab = None
    if os.geteuid() == 0 and shutil.which("wireguard-go") and shutil.which("wg"):
        lab = WgLab()
    else:
        log("no WireGuard row: needs root, wireguard-go and wg")

    systems = [("direct", direct), ("seaport", seaport(args.bin))]
    if args.rathole:
        systems.append(("rathole (noise)", rathole(args.rathole)))
    else:
        log("no rathole column: pass --rathole PATH (cargo install rathole)")
    results = {name: {} for name, _ in systems}
    try:
        for r in range(args.rounds):
            for name, start in systems:
                log(f"round {r + 1}: {name}")
                procs = Procs()
                try:
                    ports = start(procs, backends, lab is not None)
                    wait_udp(ports["echo"])
                    res = results[name]
                    for mbit in RATES_MBIT:
                        res.setdefault(f"loss {mbit}", []).append(loss_at(ports["iperf"], mbit))
                    for size in (64, 1400):
                        res.setdefault(f"pps {size}", []).append(pps(ports["iperf"], size))
                    p50, p99, lost = request_response(ports["echo"])
                    res.setdefault("rr p50", []).append(p50)
                    res.setdefault("rr p99", []).append(p99)
                    if lab:
                        res.setdefault("wg", []).append(lab.tunnel(ports["wg"], forward=name == "direct"))
                        lab.stop_tunnel()
                finally:
                    procs.stop()
    finally:
        shared.stop()
        if lab:
            lab.stop_tunnel()
            lab.down()

    med = {name: {k: statistics.median(v) for k, v in res.items()} for name, res in results.items()}
    names = [n for n, _ in systems]
    print(f"| UDP, loopback, median of {args.rounds} rounds | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mbit in RATES_MBIT:
        print(f"| loss at {mbit} Mbit/s (1,400 B) | " +
              " | ".join(f"{med[n][f'loss {mbit}']:.2f} %" for n in names) + " |")
    best = {n: max([m for m in RATES_MBIT if med[n][f"loss {m}"] < 1.0], default=0) for n in names}
    print("| highest rate with < 1 % loss | " + " | ".join(f"{best[n]} Mbit/s" for n in names) + " |")
    for size in (64, 1400):
        print(f"| datagrams/s received, {size} B | " + " | ".join(f"{med[n][f'pps {size}']:,.0f}" for n in names) + " |")
    print("| request/response p50 | " + " | ".join(f"{med[n]['rr p50']:.0f} µs" for n in names) + " |")
    print("| request/response p99 | " + " | ".join(f"{med[n]['rr p99']:.0f} µs" for n in names) + " |")
    if lab:
        print("| WireGuard + iperf3 TCP | " + " | ".join(f"{med[n]['wg']:.0f} Mbit/s" for n in names) + " |")


if __name__ == "__main__":
    main()
