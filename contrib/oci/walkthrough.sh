#!/usr/bin/env bash
# The README's walkthrough with the OCI image under runc: a registry, a
# service and a proxy, each in its own container (one bundle each, unpacked
# from the image with umoci) and its own network namespace, run as the
# image's user (nonroot, 65532) on a read-only root filesystem, with no
# capability; each reads its seed from a file bind-mounted read-only at
# /run/seaport/seed (never in argv, nor in the environment of the image or
# of the container). An HTTP backend runs beside the service's container in
# its namespace, curl beside the proxy's; curl's answer must be the
# backend's page.
#
#   contrib/oci/walkthrough.sh LAYOUT[:TAG]   # an image from contrib/oci/build.sh (TAG: latest)
#
# The network, all in namespaces of its own (nothing in the root one):
#
#   ${P}reg  10.201.0.1  registry --listen 10.201.0.1:4500 --no-dht
#   ${P}svc  10.201.0.2  service  --listen 10.201.0.2:4600; backend 127.0.0.1:8080
#   ${P}prx  10.201.0.3  proxy    -p 6000 (127.0.0.1); curl
#   each an eth0 on a veth pair to the bridge br0 in ${P}sw
#
# P is ${OCI_WALK_PREFIX:-ocw-}. Services and proxies name the registry
# KEY@10.201.0.1:4500 (no DHT). The service lets in the proxy's key only
# (--allow) and the proxy trusts the service's key only (--service-key), so
# the walkthrough passes only if every container read its own seed.
#
# Whatever happens, the exit trap kills and deletes every container, stops
# the backend and deletes the namespaces (which takes their veths along).
# Needs root, runc, umoci, iproute2, curl and python3. Exit status 0 when
# curl got the page through the proxy and every check held, 1 otherwise.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
[[ $# -eq 1 && "$1" != -* ]] || { usage >&2; exit 2; }
IMAGE="$1"
[[ "$IMAGE" == *:* ]] || IMAGE="$IMAGE:latest"
[[ $(id -u) -eq 0 ]] || { echo "walkthrough: needs root (runc, network namespaces)" >&2; exit 1; }
for tool in runc umoci ip curl python3; do
    command -v "$tool" >/dev/null || { echo "walkthrough: $tool is missing" >&2; exit 1; }
done

P="${OCI_WALK_PREFIX:-ocw-}"
[[ "$P" =~ ^[a-z][a-z0-9-]{0,7}$ ]] || { echo "walkthrough: OCI_WALK_PREFIX must match ^[a-z][a-z0-9-]{0,7}\$" >&2; exit 2; }
NET=10.201.0
REGISTRY_ADDR=$NET.1:4500 SERVICE_ADDR=$NET.2:4600
BACKEND_PORT=8080 PROXY_PORT=6000
NAMES=(reg svc prx)
PAGE="Hello from the backend, through seaport in OCI containers."
START=$SECONDS

work="$(mktemp -d)"
STATE="$work/runc"            # runc's state: ours only
ids=() made=() backend_pid=""
say() { printf 'walkthrough: %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM   # a second Ctrl-C must not cut the cleanup short
    set +e
    for id in "${ids[@]}"; do
        runc --root "$STATE" kill "$id" KILL >/dev/null 2>&1
        runc --root "$STATE" delete -f "$id" >/dev/null 2>&1
    done
    if [[ -n "$backend_pid" ]]; then kill "$backend_pid" 2>/dev/null; wait "$backend_pid" 2>/dev/null; fi
    # Only the namespaces this run made: another's are not ours to end.
    for ns in "${made[@]}"; do
        # Anything still in the namespace is ours: stop it by its pid.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    if [[ $rc -ne 0 ]]; then
        for n in "${NAMES[@]}"; do
            for f in "$work/$n.out" "$work/$n.err"; do
                [[ -s "$f" ]] && { echo "---- $f" >&2; tail -n 30 "$f" >&2; }
            done
        done
        say "FAILED (exit $rc)"
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { say "FAIL: $*"; exit 1; }
# wait_for FILE PATTERN: until FILE has a line matching PATTERN (10 s at most).
wait_for() {
    for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    fail "no '$2' in $1 after 10 s"
}

# ---- the network ----------------------------------------------------------------------------
# One run at a time per prefix; holding the lock, namespaces of the prefix
# are a crashed run's leftovers (SIGKILL, a CI timeout: no trap ran).
mkdir -p /run/lock
exec 9>"/run/lock/seaport-oci-walkthrough-$P.lock"
flock -n 9 || fail "another walkthrough with prefix $P is running (set OCI_WALK_PREFIX)"
for n in "${NAMES[@]}" sw; do
    if ip netns list | awk '{print $1}' | grep -qx "$P$n"; then
        say "removing $P$n, left by an earlier run"
        for pid in $(ip netns pids "$P$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        ip netns del "$P$n"
    fi
done
ip netns add "${P}sw"
made+=("${P}sw")
ip -n "${P}sw" link add br0 type bridge
ip -n "${P}sw" link set br0 up
i=1
for n in "${NAMES[@]}"; do
    ip netns add "$P$n"
    made+=("$P$n")
    ip -n "$P$n" link set lo up
    ip link add "$P$n" netns "${P}sw" type veth peer name eth0 netns "$P$n"
    ip -n "${P}sw" link set "$P$n" master br0 up
    ip -n "$P$n" addr add "$NET.$i/24" dev eth0
    ip -n "$P$n" link set eth0 up
    i=$((i + 1))
done

# ---- the bundles: one per container, from the image ---------------------------------------
for n in "${NAMES[@]}"; do
    umoci unpack --image "$IMAGE" "$work/bundle-$n" >/dev/null
done
bin="$work/bundle-reg/rootfs/usr/local/bin"   # seaport-seed from the image, run here

# ---- the seeds: made outside, readable by the image's user only ---------------------------
mkdir -m 0700 "$work/seeds"
declare -A KEY
for n in "${NAMES[@]}"; do
    f="$work/seeds/$n.seed"
    KEY[$n]="$("$bin/seaport-seed" --json --seed-file "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pubkey"])')"
    chown 65532:65532 "$f"
    chmod 0400 "$f"
done
REG="${KEY[reg]}@$REGISTRY_ADDR"

# configure NAME ARGS...: the bundle's config.json for this container.
configure() {
    local n="$1"; shift
    python3 - "$work/bundle-$n/config.json" "/var/run/netns/$P$n" "$work/seeds/$n.seed" "$n" "$@" <<'EOF'
import json, sys
path, netns, seed, name, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
c = json.load(open(path))
p = c["process"]
p["terminal"] = False              # detached: stdio goes to our files
p["args"] = args
p["env"] = [e for e in p["env"] if not e.startswith("TERM=")]
p["noNewPrivileges"] = True
p["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
c["root"]["readonly"] = True
c["hostname"] = "seaport-" + name
c["mounts"].append({"destination": "/run/seaport/seed", "type": "bind", "source": seed,
                    "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
for ns in c["linux"]["namespaces"]:
    if ns["type"] == "network":
        ns["path"] = netns
json.dump(c, open(path, "w"), indent=2)
EOF
}
# start NAME: runs the container detached, its stdout and stderr to files.
start() {
    local n="$1" id="$P$1-$$"
    ids+=("$id")   # first: a half-created container is deleted too
    runc --root "$STATE" run --detach --pid-file "$work/$n.pid" --bundle "$work/bundle-$n" "$id" \
        >"$work/$n.out" 2>"$work/$n.err" </dev/null
}
# check NAME: the container's process as it should be.
check() {
    local n="$1" pid; pid="$(cat "$work/$n.pid")"
    grep -Eq '^Uid:[[:space:]]+65532[[:space:]]+65532' "/proc/$pid/status" || fail "$n does not run as uid 65532"
    grep -Eq '^Gid:[[:space:]]+65532[[:space:]]+65532' "/proc/$pid/status" || fail "$n does not run as gid 65532"
    grep -Eq '^CapEff:[[:space:]]+0+$' "/proc/$pid/status" || fail "$n has capabilities"
    awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo" | grep -Eq '(^|,)ro(,|$)' || fail "$n's root is not read-only"
    # The seeds are read from their files (-f): never on a command line, not even grep's.
    for f in "$work"/seeds/*.seed; do
        ! tr '\0' '\n' < "/proc/$pid/cmdline" | grep -qiFf "$f" || fail "a seed is in $n's argv"
        ! tr '\0' '\n' < "/proc/$pid/environ" | grep -qiFf "$f" || fail "a seed is in $n's environment"
    done
    [[ "$(readlink "/proc/$pid/ns/net")" == "$(ip netns exec "$P$n" readlink /proc/self/ns/net)" ]] \
        || fail "$n is not in the namespace $P$n"
}

# The image's own config carries no seed either.
for f in "$work"/seeds/*.seed; do
    ! grep -qiFf "$f" "$work"/bundle-*/config.json || fail "a seed is in a bundle's config.json"
done

# ---- the walkthrough ----------------------------------------------------------------------
say "1. registry in ${P}reg, $REGISTRY_ADDR"
configure reg seaport-registry --seed-file /run/seaport/seed --listen "$REGISTRY_ADDR" --no-dht
start reg
wait_for "$work/reg.out" "Registry listening"
grep -q "pubkey ${KEY[reg]}" "$work/reg.out" || fail "the registry's key is not the one of its seed file"
check reg

say "2. backend on 127.0.0.1:$BACKEND_PORT and service web@1.0.0 in ${P}svc"
mkdir -p "$work/site"
echo "$PAGE" > "$work/site/index.html"
ip netns exec "${P}svc" python3 -m http.server "$BACKEND_PORT" --bind 127.0.0.1 --directory "$work/site" \
    >"$work/backend.log" 2>&1 &
backend_pid=$!
configure svc seaport-service "$REG" --seed-file /run/seaport/seed -p "$BACKEND_PORT" -r web@1.0.0 \
    --listen "$SERVICE_ADDR" --allow "${KEY[prx]}"
start svc
wait_for "$work/svc.out" "registered service"
check svc

say "3. proxy web@1.x on 127.0.0.1:$PROXY_PORT in ${P}prx"
configure prx seaport-proxy "$REG" --seed-file /run/seaport/seed -p "$PROXY_PORT" -r web@1.x \
    --service-key "${KEY[svc]}"
start prx
wait_for "$work/prx.out" "proxy from"
check prx

say "4. curl http://127.0.0.1:$PROXY_PORT/ in ${P}prx"
answer="$(ip netns exec "${P}prx" curl -sS --max-time 10 "http://127.0.0.1:$PROXY_PORT/")" || fail "curl failed"
say "   $answer"
[[ "$answer" == "$PAGE" ]] || fail "curl got '$answer', not the backend's page"
for n in "${NAMES[@]}"; do sed "s/^/   $n| /" "$work/$n.out" >&2; done

say "5. stop: SIGTERM to each container"
for id in "${ids[@]}"; do runc --root "$STATE" kill "$id" TERM; done
for id in "${ids[@]}"; do
    for _ in $(seq 1 300); do
        [[ "$(runc --root "$STATE" state "$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" == stopped ]] && break
        sleep 0.05
    done
    runc --root "$STATE" delete "$id" || fail "$id did not stop on SIGTERM within 15 s"
done
ids=()
say "passed in $((SECONDS - START)) s (3 containers: uid 65532, read-only root, no capability, seeds from read-only files)"
