#!/usr/bin/env bash
# Durable registrations like for like, builds alternated (in reverse order every other round,
# so that a host speeding up or slowing down does not favour one build): for each round and
# each build, a fresh copy of a kept benchmark database (migrated by the build under test), a
# 1 s `/health` warm-up, then one `wrk -t1 -c64` run of pairs minted for it. Prints req/s and
# the CPU each of the server's threads spent per registration (from
# /proc/<pid>/task/*/schedstat).
# Usage: bench/registrations.sh KEPT_DIR BINARY [BINARY...]
#   KEPT_DIR: what `KEEP=1 bash bench/run.sh` leaves behind (bench.db, master.key).
# Environment: ROUNDS (5), RUN_SECONDS (3), LOG (warn: the server's --log-level).
set -euo pipefail
kept=$1; shift
rounds=${ROUNDS:-5}; seconds=${RUN_SECONDS:-3}; log=${LOG:-warn}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18190
cpu() { # thread name -> summed ns on CPU, for process $1
    for t in /proc/"$1"/task/*; do
        printf '%s %s\n' "$(tr -d ' ' < "$t/comm")" "$(cut -d' ' -f1 "$t/schedstat")"
    done | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}
reversed=(); for bin in "$@"; do reversed=("$bin" "${reversed[@]}"); done
for round in $(seq 1 "$rounds"); do
    if (( round % 2 )); then order=("$@"); else order=("${reversed[@]}"); fi
    for bin in "${order[@]}"; do
        rm -rf "$work/run"; mkdir -p "$work/run/data"
        cp "$kept/bench.db" "$work/run/bench.db"
        install -m 600 "$kept/master.key" "$work/run/master.key"
        "$bin" issue --count 100000 --master-key-file "$work/run/master.key" > "$work/run/pairs.txt"
        cat > "$work/run/register.lua" <<LUA
local requests, n, i = {}, 0, 0
local headers = {["Content-Type"] = "application/json"}
for line in io.lines("$work/run/pairs.txt") do
  n = n + 1
  requests[n] = wrk.format("POST", "/credentials", headers, line)
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return requests[i]
end
LUA
        "$bin" serve --listen "127.0.0.1:$port" --log-level "$log" \
            --database-url "sqlite://$work/run/bench.db" --master-key-file "$work/run/master.key" \
            --data-dir "$work/run/data" > "$work/run/server.log" 2>&1 &
        server=$!
        until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 0.2; done
        wrk -t1 -c32 -d1s "http://127.0.0.1:$port/health" > /dev/null
        cpu "$server" > "$work/before"
        wrk -t1 -c64 -d"${seconds}s" -s "$work/run/register.lua" "http://127.0.0.1:$port/" > "$work/wrk.txt"
        cpu "$server" > "$work/after"
        kill -TERM "$server"; wait "$server" || true
        made=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
        rate=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$work/wrk.txt")
        printf 'round %s  %-40s %6s registrations/s  µs of CPU per registration:' "$round" "$bin" "$rate"
        join "$work/before" "$work/after" | awk -v n="$made" '$1 ~ /^(credgate-writer|credgate-ckpt|tokio-rt-worker)$/ {printf " %s %.1f", $1, ($3 - $2) / 1000 / n}'
        echo
    done
done
