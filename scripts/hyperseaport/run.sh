#!/bin/bash
# hyperseaport 3.2.0's HTTP gateway (`hyperseaport web`) on loopback, for the
# comparison in BENCHMARKS.md ("HTTP gateway"): a 5-node hyperdht testnet on
# 127.0.0.1 (hyperseaport takes no bootstrap list, so local-dht.js swaps
# hyperdht's built-in one), a registry, python3's http.server as the origin,
# a service, and the gateway; then curl fetches a 1 MiB and a 100 MiB file
# through /role/files/<file> and through `hyperseaport proxy`, checking the
# sha256 of what arrives. Needs node, npm (the npm registry) and python3.
#
#   scripts/hyperseaport/run.sh [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-3}
work=$(mktemp -d /tmp/seaport-hyperseaport.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cp "$here/package.json" "$here/local-dht.js" "$here/testnet.js" "$work/"
cd "$work"
# Two of its dependencies point at GitHub; package.json's overrides take the
# same code from npm.
npm install --silent --no-audit --no-fund >/dev/null
mkdir -p data home
head -c 1048576 /dev/urandom > data/1m.bin
head -c 104857600 /dev/urandom > data/100m.bin
export HOME=$work/home HSP_BOOTSTRAP=127.0.0.1:30001
cli="node -r ./local-dht.js node_modules/hyperseaport/cli.js"
# Fixed seeds: a loopback benchmark's registry and service, nothing else.
registrySeed=420f556b176407ab23fdc409e6ab09fa58cb58b59ddd8e7875a73f200f130b33
registryPublicKey=3b7195f13e3b9ecc80e76c0152e11d70f29e1bb54948e4d1b6d7a5584da31787
serviceSeed=6e987b5d1c7e590fb5ac45a4e2437a8d5e6e1f27a1f7172bd671dd7320751e6c
node testnet.js 5 30001 > testnet.log 2>&1 & pids+=($!); sleep 3
$cli registry --registryDir ./home/registry --registrySeed $registrySeed > registry.log 2>&1 & pids+=($!)
python3 -m http.server 18000 --bind 127.0.0.1 --directory data > origin.log 2>&1 & pids+=($!); sleep 3
$cli service --port 18000 --role files@1.0.0 --seed $serviceSeed --registryPublicKey $registryPublicKey > service.log 2>&1 & pids+=($!); sleep 3
$cli web --web 18080 --registryPublicKey $registryPublicKey > web.log 2>&1 & pids+=($!)
$cli proxy --port 18081 --role files@1.0.0 --registryPublicKey $registryPublicKey --skipReaderRegistry > proxy.log 2>&1 & pids+=($!)
sleep 5
for f in 1m.bin 100m.bin; do
  want=$(sha256sum data/$f | cut -d' ' -f1)
  for via in "gateway http://127.0.0.1:18080/role/files/$f" "proxy http://127.0.0.1:18081/$f"; do
    set -- $via
    for i in $(seq 1 "$runs"); do
      w=$(curl -s -m 60 -o body -w '%{http_code} %{size_download} %{time_total}' "$2" || true)
      # The gateway sends the origin's status line and headers inside its
      # own body: compare what follows them.
      python3 -c 'import sys; d=open("body","rb").read(); i=d.find(b"\r\n\r\n"); sys.stdout.buffer.write(d[i+4:] if sys.argv[1]=="gateway" and i>=0 else d)' "$1" > payload
      ok=$([ "$(sha256sum payload | cut -d' ' -f1)" = "$want" ] && echo whole || echo "CUT ($(stat -c %s payload) of $(stat -c %s data/$f) bytes)")
      echo "$f via $1 run $i: status/bytes/seconds $w: $ok"
    done
  done
done
