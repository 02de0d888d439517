#!/usr/bin/env bash
# NAT traversal measurements: the real binaries in two labs of network
# namespaces (tests/netlab/netlab.sh), side by side in one run:
#
#   1. punch success: N fresh proxies on h2 each open one link to a service on
#      h1 through two cone NATs; which path each link took (its `link to`
#      line);
#   2. time to first byte, per path: direct (h3 -> h1, same LAN), punched
#      (h2 -> h1, cone NATs), relayed (h2 -> h1, nat2 symmetric); curl's
#      %{time_starttransfer}, median and max, for a fresh proxy's first GET
#      (the link is opened on first need) and for the next GETs on that link;
#   3. bulk throughput, each way, through a direct, a punched and a relayed
#      link, and plain TCP h3 -> h1 without seaport as the lab's own limit;
#      median of rounds that alternate the paths;
#   4. CPU time (utime + stime, /proc/PID/stat) per GiB moved, of the registry
#      (what relaying costs it) and of every other process on each path.
#
# Prints a markdown table on stdout (progress on stderr). Needs root,
# iproute2, iptables, curl and python3. BENCHMARKS.md has the figures.
#
#   sudo scripts/netlab-bench.sh            # full run: 50 punches, 1 GiB each way, ~1.5 min
#   sudo scripts/netlab-bench.sh --quick    # smoke (CI): small counts and sizes, ~10 s
#
# Options: --bytes N (bulk size, suffixes K M G), --punches N, --runs N (fresh
# proxies per path for first byte), --rounds N (bulk rounds), --bin DIR (the
# binaries; by default ${CARGO_TARGET_DIR:-target}/release, built first if
# cargo is found), --keep-logs (keep every process's log and say where).
#
# The two labs are named ${NETLAB_BENCH_PREFIX:-nb}c-* (cone NATs) and
# ...s-* (nat2 symmetric), so the bench runs beside `cargo test --test nat`
# and other labs. Whatever happens, the exit trap stops every process the
# bench started and takes both labs down.
#
# Exit status: 0 when every measurement could be taken, 1 when one could not
# (a bulk transfer came back short, a bulk link took an unexpected path, a
# lab did not come up). Missed targets and failed punches are results, not
# errors: they are in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NETLAB="$ROOT/tests/netlab/netlab.sh"

# The comment at the top, up to the first line that is not one.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

# ---- options ---------------------------------------------------------------------------
QUICK=0 KEEP=0 BIN="" BYTES="" PUNCHES="" RUNS="" ROUNDS=""
size() {   # size 1G -> bytes
    local n="${1%[KkMmGg]}" m=1
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "netlab-bench: not a size: $1" >&2; exit 2; }
    case "$1" in *[Kk]) m=1024 ;; *[Mm]) m=$((1024 * 1024)) ;; *[Gg]) m=$((1024 * 1024 * 1024)) ;; esac
    echo $((n * m))
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --bytes) BYTES="$(size "${2:?}")"; shift ;;
        --punches) PUNCHES="${2:?}"; shift ;;
        --runs) RUNS="${2:?}"; shift ;;
        --rounds) ROUNDS="${2:?}"; shift ;;
        --bin) BIN="${2:?}"; shift ;;
        --keep-logs) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    : "${BYTES:=$((16 * 1024 * 1024))}" "${PUNCHES:=5}" "${RUNS:=3}" "${ROUNDS:=1}"
else
    : "${BYTES:=$((1024 * 1024 * 1024))}" "${PUNCHES:=50}" "${RUNS:=10}" "${ROUNDS:=3}"
fi
for v in PUNCHES RUNS ROUNDS BYTES; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "netlab-bench: --${v,,} must be a positive integer" >&2; exit 2; }
done

say() { echo "netlab-bench: $*" >&2; }
die() { say "$*"; exit 1; }

# ---- what it needs ---------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "needs root (network namespaces): sudo $0"
for tool in ip iptables curl; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install iproute2 iptables curl)"
done
PY=/usr/bin/python3
[[ -x $PY ]] || PY="$(command -v python3 || true)"
[[ -n "$PY" ]] || die "needs python3"
if [[ -z "$BIN" ]]; then
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    if command -v cargo >/dev/null; then
        say "building the release binaries"
        cargo build --release -q -p seaport-seed -p seaport-registry -p seaport-service -p seaport-proxy
    fi
fi
BIN="$(cd "$BIN" && pwd)"
for b in seaport-seed seaport-registry seaport-service seaport-proxy; do
    [[ -x "$BIN/$b" ]] || die "no $BIN/$b (cargo build --release, or --bin DIR)"
done

BASE="${NETLAB_BENCH_PREFIX:-nb}"
CONE="${BASE}c-" SYM="${BASE}s-"
REGISTRY=203.0.113.10:4000
H1=192.168.1.2
WEB_PORT=8000 BULK_PORT=9000
HZ="$(getconf CLK_TCK)"
export RUST_LOG=info   # the proxy's `link to` lines are at info
unset SEAPORT_BOOTSTRAP SEAPORT_REGISTRY_SEED

W="$(mktemp -d /tmp/netlab-bench.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    NETLAB_PREFIX="$CONE" "$NETLAB" down >/dev/null 2>&1 || say "netlab down ($CONE) failed"
    NETLAB_PREFIX="$SYM" "$NETLAB" down >/dev/null 2>&1 || say "netlab down ($SYM) failed"
    if [[ $KEEP == 1 ]]; then say "logs kept in $W"; else rm -rf "$W"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- processes in the labs ---------------------------------------------------------------
# start NAME NS CMD...: runs CMD in namespace NS, stdout to $W/NAME.out and stderr to
# $W/NAME.err; its pid (`ip netns exec` execs CMD, so the pid is CMD's) in $STARTED.
STARTED=""
start() {
    local name="$1" ns="$2"; shift 2
    ip netns exec "$ns" "$@" >"$W/$name.out" 2>"$W/$name.err" &
    STARTED=$!
    PIDS+=("$STARTED")
}
# stop PID: TERM, and reap it.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
# wait_for FILE PATTERN [SECONDS]: until FILE has a line matching PATTERN.
wait_for() {
    local i n=$(( ${3:-20} * 50 ))
    for ((i = 0; i < n; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.02
    done
    return 1
}
need() {   # need FILE PATTERN WHAT: wait_for, or fail with the process's log
    wait_for "$1" "$2" || { say "timed out waiting for $3; its log:"; cat "${1%.*}".{out,err} >&2 2>/dev/null; exit 1; }
}

# The bulk backend and client (stdlib only). The backend answers `DOWN N` with N zero
# bytes, and `UP` by counting bytes to the end and answering with the count; the client
# times a transfer from its connect to its last byte (down) or to the count (up).
cat >"$W/bulk.py" <<'PY'
import json, os, socket, sys, threading, time
CHUNK = 1 << 20
def serve(port):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(64)
    print("READY", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def handle(c):
    try:
        head = b""
        while b"\n" not in head:
            k = c.recv(4096)
            if not k: return
            head += k
        line, rest = head.split(b"\n", 1); words = line.split()
        if words[:1] == [b"DOWN"]:
            left, buf = int(words[1]), bytes(CHUNK)
            while left:
                n = min(left, CHUNK); c.sendall(buf if n == CHUNK else buf[:n]); left -= n
        elif words == [b"UP"]:
            got, buf = len(rest), bytearray(CHUNK)
            while True:
                k = c.recv_into(buf)
                if not k: break
                got += k
            c.sendall(b"%d\n" % got)
    except OSError:
        pass
    finally:
        c.close()
def client(mode, host, port, n):
    t0 = time.monotonic()
    s = socket.create_connection((host, port), timeout=120)
    buf = bytearray(CHUNK); view = memoryview(buf); got = 0
    if mode == "down":
        s.sendall(b"DOWN %d\n" % n)
        while True:
            k = s.recv_into(view)
            if not k: break
            got += k
    else:
        s.sendall(b"UP\n"); left = n; zero = bytes(CHUNK)
        while left:
            k = min(left, CHUNK); s.sendall(zero if k == CHUNK else zero[:k]); left -= k
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile("rb").readline().strip()
        got = int(reply) if reply else 0
    dt = time.monotonic() - t0
    t = os.times()
    print(json.dumps({"bytes": got, "seconds": dt, "cpu": t.user + t.system}))
    sys.exit(0 if got == n else 1)
if sys.argv[1] == "serve": serve(int(sys.argv[2]))
else: client(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
PY
mkdir -p "$W/site"
printf 'seaport netlab bench\n' >"$W/site/index.html"

# ---- a lab: registry on pub, web and bulk backends and their services on h1 ------------------
declare -A TARGET REGPID SVCPID BULKPID
lab_up() {   # lab_up PREFIX [netlab up options]
    local p="$1"; shift
    NETLAB_PREFIX="$p" "$NETLAB" down >/dev/null 2>&1 || true
    NETLAB_PREFIX="$p" "$NETLAB" up "$@" 2>"$W/${p}netlab.err" || { cat "$W/${p}netlab.err" >&2; die "netlab up $* failed"; }
    local json seed key
    json="$("$BIN/seaport-seed" --json)"
    seed="$(sed -n 's/.*"seed": "\([0-9a-f]*\)".*/\1/p' <<<"$json")"
    key="$(sed -n 's/.*"pubkey": "\([0-9a-f]*\)".*/\1/p' <<<"$json")"
    [[ -n "$seed" && -n "$key" ]] || die "could not read seaport-seed --json: $json"
    TARGET[$p]="$key@$REGISTRY"
    SEAPORT_REGISTRY_SEED="$seed" start "${p}registry" "${p}pub" "$BIN/seaport-registry" --listen "$REGISTRY" --no-dht
    REGPID[$p]=$STARTED
    need "$W/${p}registry.out" "Registry listening" "the registry ($p)"
    start "${p}web" "${p}h1" "$PY" -m http.server "$WEB_PORT" --bind 0.0.0.0 --directory "$W/site"
    start "${p}bulk" "${p}h1" "$PY" "$W/bulk.py" serve "$BULK_PORT"
    BULKPID[$p]=$STARTED
    need "$W/${p}bulk.out" READY "the bulk backend ($p)"
    local i
    for ((i = 0; i < 100; i++)); do
        ip netns exec "${p}h1" curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$WEB_PORT/" && break
        sleep 0.05
    done
    start "${p}svc-web" "${p}h1" "$BIN/seaport-service" "${TARGET[$p]}" -p "$WEB_PORT" -r web@1.0.0
    start "${p}svc-bulk" "${p}h1" "$BIN/seaport-service" "${TARGET[$p]}" -p "$BULK_PORT" -r bulk@1.0.0
    SVCPID[$p]=$STARTED
    need "$W/${p}svc-web.out" "registered service" "the web service ($p)"
    need "$W/${p}svc-bulk.out" "registered service" "the bulk service ($p)"
}

# proxy NAME PREFIX HOST ROLE: a fresh proxy, once it serves; pid in $STARTED, port in $PORT.
PORT=""
proxy() {
    local name="$1" p="$2" host="$3" role="$4"
    start "$name" "$p$host" "$BIN/seaport-proxy" "${TARGET[$p]}" -p 0 -r "$role"
    local pid=$STARTED
    need "$W/$name.out" "^proxy from " "proxy $name"
    PORT="$(sed -n 's/^proxy from \([0-9]*\) .*/\1/p' "$W/$name.out" | head -1)"
    STARTED=$pid
}
# path_of NAME: the path the proxy's first link ends up on (direct|punched|relayed), or
# "none". The relay races the punch, so a link may start relayed and move to the punched path
# a moment later (`link to KEY moved to punched ADDR`): a relayed one is given 2 s to move.
path_of() {
    if ! wait_for "$W/$1.err" "link to .* via " 5; then
        echo none
        return
    fi
    if grep -q "link to .* via relayed " "$W/$1.err"; then
        wait_for "$W/$1.err" "link to .* moved to " 2 || true
    fi
    sed -n 's/.*link to [0-9a-f]* \(via\|moved to\) \([a-z]*\) .*/\2/p' "$W/$1.err" | tail -1
}
# cpu PID: the process's utime + stime, in clock ticks.
# (Fields 14 and 15 of /proc/PID/stat; counted after the ") " that ends the command
# name, which may itself hold spaces, they are the 12th and 13th.)
cpu() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
stime() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $13 }'; }

LOAD0="$(cut -d' ' -f1 /proc/loadavg)"
say "labs up: ${CONE}* (cone NATs), ${SYM}* (nat2 symmetric)"
lab_up "$CONE"
lab_up "$SYM" --symmetric

# ---- 1 + 2: fresh proxies, one request each ----------------------------------------------------
declare -A SEEN TTFB
NEXT=2   # GETs after the first, on the link the first one made
# get NS PORT: "HTTP-CODE FIRST-BYTE-SECONDS" of one GET through the proxy on NS's 127.0.0.1:PORT
get() {
    ip netns exec "$1" curl -s -o /dev/null --max-time 10 -w '%{http_code} %{time_starttransfer}' \
        "http://127.0.0.1:$2/" || true
}
# first_byte LABEL PREFIX HOST WANT: a fresh proxy for web@1 on HOST, one GET, the path its
# link took, then $NEXT more GETs on that link; records the first-byte times (TTFB[WANT] for
# the first GET, TTFB[next:WANT] for the others) if the link took the path WANT.
first_byte() {
    local label="$1" p="$2" host="$3" want="$4" name out code t path pid
    name="ttfb-$label"
    proxy "$name" "$p" "$host" web@1
    pid=$STARTED
    out="$(get "$p$host" "$PORT")"
    code="${out%% *}" t="${out#* }"
    path="$(path_of "$name")"
    [[ $code == 200 ]] || path="$path/failed(http ${code:-none})"
    SEEN["$want:$path"]=$(( ${SEEN["$want:$path"]:-0} + 1 ))
    if [[ $path == "$want" ]]; then
        TTFB[$want]+="$t "
        local k
        for ((k = 0; k < NEXT; k++)); do
            out="$(get "$p$host" "$PORT")"
            [[ ${out%% *} == 200 ]] && TTFB[next:$want]+="${out#* } "
        done
        stop "$pid"
    else
        stop "$pid"
        { echo "== $label: expected $want, got $path; proxy log:"; cat "$W/$name.err"; } >>"$W/surprises.log"
    fi
    [[ $KEEP == 1 ]] && cp "$W/$name.err" "$W/$label.proxy.err"
    return 0
}
say "$PUNCHES fresh proxies h2 -> h1 through cone NATs; $RUNS each direct (h3 -> h1) and relayed (symmetric)"
n=$(( PUNCHES > RUNS ? PUNCHES : RUNS ))
for ((i = 1; i <= n; i++)); do
    ((i <= PUNCHES)) && first_byte "punch-$i" "$CONE" h2 punched
    if ((i <= RUNS)); then
        first_byte "direct-$i" "$CONE" h3 direct
        first_byte "relayed-$i" "$SYM" h2 relayed
        # without seaport: curl on h3 straight to the backend on h1
        t="$(ip netns exec "${CONE}h3" curl -s -o /dev/null --max-time 10 -w '%{time_starttransfer}' "http://$H1:$WEB_PORT/")"
        TTFB[plain]+="$t "
    fi
    ((i % 10 == 0)) && say "  $i of $n"
done

# ---- 3 + 4: bulk, each way, per path, and the CPU time it costs ------------------------------
say "bulk: $BYTES bytes each way, $ROUNDS round(s) over plain TCP, direct, punched and relayed"
proxy bulk-direct "$CONE" h3 bulk@1; PID_D=$STARTED PORT_D=$PORT
proxy bulk-punched "$CONE" h2 bulk@1; PID_P=$STARTED PORT_P=$PORT
proxy bulk-relayed "$SYM" h2 bulk@1; PID_R=$STARTED PORT_R=$PORT
declare -A NS_OF PORT_OF
NS_OF[plain]="${CONE}h3" PORT_OF[plain]="$H1:$BULK_PORT"
NS_OF[direct]="${CONE}h3" PORT_OF[direct]="127.0.0.1:$PORT_D"
NS_OF[punched]="${CONE}h2" PORT_OF[punched]="127.0.0.1:$PORT_P"
NS_OF[relayed]="${SYM}h2" PORT_OF[relayed]="127.0.0.1:$PORT_R"
# The processes a path's bytes pass through besides the client (which times itself), as
# role=pid; the registry is there on every seaport path, to show what it costs each.
procs() {
    case "$1" in
        plain) echo "backend=${BULKPID[$CONE]}" ;;
        direct) echo "proxy=$PID_D service=${SVCPID[$CONE]} registry=${REGPID[$CONE]} backend=${BULKPID[$CONE]}" ;;
        punched) echo "proxy=$PID_P service=${SVCPID[$CONE]} registry=${REGPID[$CONE]} backend=${BULKPID[$CONE]}" ;;
        relayed) echo "proxy=$PID_R service=${SVCPID[$SYM]} registry=${REGPID[$SYM]} backend=${BULKPID[$SYM]}" ;;
    esac
}
# transfer PATH down|up BYTES: prints "bytes seconds client-cpu-seconds"; fails on a short
# transfer.
transfer() {
    local addr="${PORT_OF[$1]}" json
    json="$(ip netns exec "${NS_OF[$1]}" "$PY" "$W/bulk.py" "$2" "${addr%:*}" "${addr##*:}" "$3")" ||
        die "bulk $2 over $1: short transfer ($json)"
    sed 's/.*"bytes": \([0-9]*\), "seconds": \([0-9.e-]*\), "cpu": \([0-9.e-]*\).*/\1 \2 \3/' <<<"$json"
}
add() { awk -v a="${1:-0}" -v b="$2" 'BEGIN { printf "%.6f", a + b }'; }
# warm up: each link up, and on the path it is there to measure
WARM=$((1024 * 1024))
BAD=0
for path in direct punched relayed; do
    res="$(transfer "$path" down "$WARM")"
    got="$(path_of "bulk-$path")"
    if [[ $got != "$path" ]]; then
        say "the bulk link for $path went $got instead; proxy log:"; cat "$W/bulk-$path.err" >&2; BAD=1
    fi
done
[[ $BAD == 0 ]] || exit 1
# RATES[path:dir]: MB/s of each round; per path over all transfers: TICKS[path:role] CPU clock
# ticks, CLIENT[path] client CPU seconds, WALL[path] seconds, MOVED[path] bytes.
declare -A RATES TICKS CLIENT WALL MOVED
# machine: the whole machine's busy clock ticks (all CPUs) and, of them, softirq ticks, to tell
# how much else ran beside the bulk. Softirq time (packets through the lab's veths, bridges
# and NATs, mostly ours) is charged to no process.
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $8; exit }' /proc/stat; }
read -r M0 S0 <<<"$(machine)"; T0="$(date +%s.%N)"
for ((r = 1; r <= ROUNDS; r++)); do
    for path in plain direct punched relayed; do
        for dir in down up; do
            read -r -a list <<<"$(procs "$path")"
            before=()
            for e in "${list[@]}"; do before+=("$(cpu "${e#*=}")"); done
            [[ $path == relayed ]] && rs0="$(stime "${REGPID[$SYM]}")"
            res="$(transfer "$path" "$dir" "$BYTES")"
            read -r b s c <<<"$res"
            [[ $path == relayed ]] && REG_SYS=$(( ${REG_SYS:-0} + $(stime "${REGPID[$SYM]}") - rs0 ))
            for i in "${!list[@]}"; do
                k="$path:${list[$i]%%=*}"
                TICKS[$k]=$(( ${TICKS[$k]:-0} + $(cpu "${list[$i]#*=}") - before[i] ))
            done
            RATES["$path:$dir"]+="$(awk -v b="$b" -v s="$s" 'BEGIN { printf "%.1f", b / s / 1e6 }') "
            CLIENT[$path]="$(add "${CLIENT[$path]:-}" "$c")" WALL[$path]="$(add "${WALL[$path]:-}" "$s")"
            MOVED[$path]=$(( ${MOVED[$path]:-0} + b ))
        done
    done
    say "  round $r of $ROUNDS"
done
read -r M1 S1 <<<"$(machine)"; T1="$(date +%s.%N)"
for path in direct punched relayed; do
    count="$(grep -c "link to .* via " "$W/bulk-$path.err" || true)"
    [[ $count == 1 ]] || { say "the bulk proxy for $path made $count links:"; grep "link to" "$W/bulk-$path.err" >&2; BAD=1; }
done
[[ $BAD == 0 ]] || exit 1
# What the relay itself moved (the link's frames, crypto and pings included): the
# registry logs it when the relay ends, so end it, and read the line that says so.
ended="$(grep -c "relay ended" "$W/${SYM}registry.err" || true)"
stop "$PID_R"; stop "$PID_P"; stop "$PID_D"
for ((i = 0; i < 250; i++)); do
    (( $(grep -c "relay ended" "$W/${SYM}registry.err" || true) > ended )) && break
    sleep 0.02
done
RELAYED_WIRE="$(grep "relay ended" "$W/${SYM}registry.err" | tail -n +$((ended + 1)) |
    sed -n 's/.*to_service=\([0-9]*\).*to_proxy=\([0-9]*\).*/\1 \2/p' | awk '{ t += $1 + $2 } END { print t + 0 }')"

# ---- the table ---------------------------------------------------------------------------------
stats() {   # stats "v v v" SCALE -> "median max n" of the values times SCALE
    tr ' ' '\n' <<<"$1" | grep . | sort -g | awk -v k="$2" '
        { v[NR] = $1 * k } END {
            if (!NR) { print "- - 0"; exit }
            m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%s %s %d\n", m, v[NR], NR }'
}
fmt() { awk -v x="$1" 'BEGIN { if (x == "" || x == "-") print ""; else if (x >= 100) printf "%.0f", x; else if (x >= 10) printf "%.1f", x; else printf "%.2f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "-" || b == "-" || b == 0) print ""; else printf "%.2f×", a / b }'; }
# row MEASURE UNIT PLAIN DIRECT PUNCHED RELAYED [-]: one line of the table, with the relayed
# figure against the direct and the punched one (not with "-": first-byte times are the
# paths' timers, 150 ms before a meeting and 500 ms more before relaying, not a cost).
row() {
    local vd="" vp=""
    [[ ${7:-} == - ]] || vd="$(ratio "$6" "$4")" vp="$(ratio "$6" "$5")"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$(fmt "$3")" "$(fmt "$4")" "$(fmt "$5")" \
        "$(fmt "$6")" "$vd" "$vp"
}
declare -A MED MAX CNT
for path in plain direct punched relayed; do
    read -r MED[ttfb:$path] MAX[ttfb:$path] CNT[ttfb:$path] < <(stats "${TTFB[$path]:-}" 1000)
    read -r MED[next:$path] MAX[next:$path] CNT[next:$path] < <(stats "${TTFB[next:$path]:-}" 1000)
    for dir in down up; do read -r MED[$path:$dir] MAX[$path:$dir] CNT[$path:$dir] < <(stats "${RATES[$path:$dir]}" 1); done
done
# per_gib PATH ROLE...: CPU seconds per GiB moved on PATH, of the given roles (client is the client)
per_gib() {
    local path="$1" t=0 role c=0; shift
    for role in "$@"; do
        if [[ $role == client ]]; then c="${CLIENT[$path]}"; else t=$((t + ${TICKS[$path:$role]:-0})); fi
    done
    awk -v t="$t" -v c="$c" -v hz="$HZ" -v b="${MOVED[$path]}" 'BEGIN { printf "%.3f", (t / hz + c) / (b / 1073741824) }'
}
# busy PATH: cores kept busy by the path's processes while it moved bytes
busy() {
    local all; all="$(per_gib "$1" client proxy service registry backend)"
    awk -v x="$all" -v b="${MOVED[$1]}" -v s="${WALL[$1]}" 'BEGIN { printf "%.2f", x * (b / 1073741824) / s }'
}
cpu_row() {   # cpu_row MEASURE ROLE... (no ratios for the registry alone: it idles off the relay)
    local m="$1"; shift
    local v=() path no=""
    [[ $* == registry ]] && no=-
    for path in plain direct punched relayed; do
        if [[ $path == plain && " $* " != *" client "* && " $* " != *" backend "* ]]; then v+=("")
        else v+=("$(per_gib "$path" "$@")"); fi
    done
    row "$m" s "${v[@]}" $no
}
punched="${SEEN[punched:punched]:-0}"
others=""
for k in "${!SEEN[@]}"; do
    [[ $k == punched:* && $k != punched:punched ]] && others+="${k#punched:} ×${SEEN[$k]}, "
done
others="${others%, }"
size_of="$(awk -v b="$BYTES" 'BEGIN { x = b / 1073741824; if (x >= 1) printf "%g GiB", x; else printf "%g MiB", b / 1048576 }')"
reg_relay="$(per_gib relayed registry)"
reg_kernel="$(awk -v k="${REG_SYS:-0}" -v t="${TICKS[relayed:registry]:-0}" 'BEGIN { if (t) printf "%.0f", 100 * k / t; else print "?" }')"
reg_core="$(awk -v t="${TICKS[relayed:registry]:-0}" -v hz="$HZ" -v s="${WALL[relayed]}" 'BEGIN { printf "%.0f", 100 * t / hz / s }')"
overhead="$(awk -v w="$RELAYED_WIRE" -v b="$((MOVED[relayed] + WARM))" 'BEGIN { if (w > 0) printf "%.4f", w / b; else print "?" }')"
ours="$(for k in "${!TICKS[@]}"; do echo "${TICKS[$k]}"; done | awk -v hz="$HZ" '{ t += $1 } END { print t / hz }')"
ours="$(add "$ours" "$(for k in "${!CLIENT[@]}"; do echo "${CLIENT[$k]}"; done | awk '{ t += $1 } END { print t }')")"
softirq="$(awk -v t="$((S1 - S0))" -v hz="$HZ" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.2f", t / hz / (b - a) }')"
beside="$(awk -v m="$((M1 - M0 - S1 + S0))" -v hz="$HZ" -v o="$ours" -v a="$T0" -v b="$T1" 'BEGIN { x = (m / hz - o) / (b - a); printf "%.2f", x < 0 ? 0 : x }')"
mode=full; [[ $QUICK == 1 ]] && mode=quick
echo "## netlab-bench ($mode): $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -sr), load average $LOAD0 at the start"
echo
echo "| measure | unit | plain TCP | direct | punched | relayed | relayed vs direct | relayed vs punched |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
row "first byte, fresh proxy, median ↓" ms "${MED[ttfb:plain]}" "${MED[ttfb:direct]}" "${MED[ttfb:punched]}" "${MED[ttfb:relayed]}" -
row "first byte, fresh proxy, max ↓" ms "${MAX[ttfb:plain]}" "${MAX[ttfb:direct]}" "${MAX[ttfb:punched]}" "${MAX[ttfb:relayed]}" -
row "first byte, next connections on the link, median ↓" ms "" "${MED[next:direct]}" "${MED[next:punched]}" "${MED[next:relayed]}"
row "first byte, next connections on the link, max ↓" ms "" "${MAX[next:direct]}" "${MAX[next:punched]}" "${MAX[next:relayed]}"
row "bulk download, $size_of ↑" MB/s "${MED[plain:down]}" "${MED[direct:down]}" "${MED[punched:down]}" "${MED[relayed:down]}"
row "bulk upload, $size_of ↑" MB/s "${MED[plain:up]}" "${MED[direct:up]}" "${MED[punched:up]}" "${MED[relayed:up]}"
cpu_row "CPU per GiB: registry ↓" registry
cpu_row "CPU per GiB: proxy + service ↓" proxy service
cpu_row "CPU per GiB: client + backend ↓" client backend
cpu_row "CPU per GiB: all of these ↓" client proxy registry service backend
row "cores busy during bulk" "" "$(busy plain)" "$(busy direct)" "$(busy punched)" "$(busy relayed)" -
echo
echo "- punch success, h2 → h1 through two cone NATs: **$punched/$PUNCHES** ($(awk -v a="$punched" -v b="$PUNCHES" 'BEGIN { printf "%.0f", 100 * a / b }') %)${others:+; other outcomes: $others}"
echo "- first byte: curl's time_starttransfer for the first GET through a fresh proxy (its link is made for that GET);" \
    "samples: ${CNT[ttfb:direct]} direct, ${CNT[ttfb:punched]} punched, ${CNT[ttfb:relayed]} relayed; plain TCP is curl on h3 straight to the backend on h1 (${CNT[ttfb:plain]});" \
    "next connections: the $NEXT GETs each fresh proxy makes after its first, on the link the first made (${CNT[next:direct]} / ${CNT[next:punched]} / ${CNT[next:relayed]} samples)"
echo "- bulk: median of $ROUNDS round(s) alternating the paths; plain TCP is h3 → h1 without seaport, direct h3 → h1, punched and relayed h2 → h1;" \
    "best round: download $(fmt "${MAX[plain:down]}") / $(fmt "${MAX[direct:down]}") / $(fmt "${MAX[punched:down]}") / $(fmt "${MAX[relayed:down]}")," \
    "upload $(fmt "${MAX[plain:up]}") / $(fmt "${MAX[direct:up]}") / $(fmt "${MAX[punched:up]}") / $(fmt "${MAX[relayed:up]}") MB/s"
echo "- CPU: utime + stime (/proc/PID/stat; the client its own) over all bulk transfers of a path, both ways, per GiB moved;" \
    "the registry spent $reg_relay s per relayed GiB, $reg_core % of one core while relaying ($reg_kernel % of it in the kernel), and relayed $overhead× the payload (frames, crypto, pings)"
echo "- during the bulk transfers, softirq (the lab's packet forwarding, charged to no process) kept $softirq cores busy on average, and everything else on this machine (other users, kernel threads) $beside"
fails=0
for path in direct punched relayed; do
    for k in "${!SEEN[@]}"; do [[ $k == "$path:"* && $k != "$path:$path" ]] && fails=$((fails + SEEN[$k])); done
done
if ((fails)); then
    echo "- links that did not take the expected path: $fails (their proxies' logs are on stderr)"
    cat "$W/surprises.log" >&2
fi
echo
echo "| target | result | |"
echo "|---|---|---|"
met() { awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b ? "met" : "**not met**") }'; }
echo "| punch success through cone NATs ≥ 95 % | $punched/$PUNCHES | $(met "$((100 * punched))" "$((95 * PUNCHES))") |"
rd="$(awk -v a="${MED[relayed:down]}" -v b="${MED[direct:down]}" 'BEGIN { printf "%.2f", a / b }')"
ru="$(awk -v a="${MED[relayed:up]}" -v b="${MED[direct:up]}" 'BEGIN { printf "%.2f", a / b }')"
echo "| relayed bulk ≥ 0.5× direct | download ${rd}×, upload ${ru}× | $(met "$(awk -v a="$rd" -v b="$ru" 'BEGIN { print (a < b ? a : b) }')" 0.5) |"
