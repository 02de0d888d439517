#!/usr/bin/env bash
# A one-command local demo, offline: builds the binaries, starts a private
# DHT (the registry's own node), a registry, an HTTP backend, a service and a
# proxy on loopback, fetches the backend's page through the proxy with a bare
# registry key, prints it, and cleans up everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "building the binaries (the first build takes a few minutes)..."
cargo build --release -p seaport-seed -p seaport-registry -p seaport-service -p seaport-proxy
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A free TCP or UDP port on loopback.
free_port() {
  python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
# Waits until FILE has a line matching PATTERN (10 s at most).
wait_for() {
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "demo: timed out waiting for '$2' in $1:" >&2; cat "$1" "$1.err" >&2 2>/dev/null; exit 1
}

backend_port=$(free_port tcp); registry_port=$(free_port tcp); dht_port=$(free_port udp); proxy_port=$(free_port tcp)

mkdir -p "$work/site"
echo "Hello from the backend, through seaport." > "$work/site/index.html"
python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$work/site" >"$work/backend.log" 2>&1 &
pids+=($!)

echo "1. make a seed (written to a file only its owner can read)"
key=$("$bin/seaport-seed" --seed-file "$work/registry.seed" | sed -n 's/.*connect with pubkey //p')
echo "   pubkey $key"

echo "2. start the registry, with its own DHT node on udp/$dht_port"
"$bin/seaport-registry" --seed-file "$work/registry.seed" --listen "127.0.0.1:$registry_port" \
  --dht-port "$dht_port" >"$work/registry.out" 2>"$work/registry.out.err" &
pids+=($!)
wait_for "$work/registry.out" "Registry listening"

export SEAPORT_BOOTSTRAP="127.0.0.1:$dht_port"
echo "3. register the backend (port $backend_port) as web@1.0.0"
"$bin/seaport-service" "$key" -p "$backend_port" -r web@1.0.0 >"$work/service.out" 2>"$work/service.out.err" &
pids+=($!)
wait_for "$work/service.out" "registered service"

echo "4. proxy web@1.x on port $proxy_port"
"$bin/seaport-proxy" "$key" -p "$proxy_port" -r web@1.x >"$work/proxy.out" 2>"$work/proxy.out.err" &
pids+=($!)
wait_for "$work/proxy.out" "proxy from"

echo "5. curl http://127.0.0.1:$proxy_port/"
answer=$(curl -sS --max-time 10 "http://127.0.0.1:$proxy_port/")
echo "   $answer"
[ "$answer" = "Hello from the backend, through seaport." ]
