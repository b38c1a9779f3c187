#!/usr/bin/env bash
# Cache misses against /health like for like, builds alternated (in reverse order every other
# round, so that a host speeding up or slowing down does not favour one build): for each round
# and each build, a fresh copy of a kept benchmark database, a 3 s `/health` run, one
# `wrk -t1 -c32` run of cache misses (the kept miss.lua: random keys among 200 000, a
# 10 000-entry cache), and a second 3 s `/health` run. Prints both rates, misses as a share of
# the mean /health, and the CPU the writer thread spent during the misses (last-used writes)
# and after them.
# Usage: bench/misses.sh KEPT_DIR BINARY [BINARY...]
#   KEPT_DIR: what `KEEP=1 bash bench/run.sh` leaves behind (bench.db, master.key, miss.lua).
# Environment: ROUNDS (3), RUN_SECONDS (5, as in bench/run.sh), AFTER_SECONDS (10).
set -euo pipefail
kept=$1; shift
rounds=${ROUNDS:-3}; seconds=${RUN_SECONDS:-5}; after=${AFTER_SECONDS:-10}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18191
writer_ms() { # ms of CPU of the writer thread of process $1
    for t in /proc/"$1"/task/*; do
        if [ "$(tr -d ' ' < "$t/comm")" = credgate-writer ]; then
            echo $(( $(cut -d' ' -f1 "$t/schedstat") / 1000000 ))
        fi
    done
}
rate() { awk '/Requests\/sec/ {printf "%.0f", $2}' "$1"; }
reversed=(); for bin in "$@"; do reversed=("$bin" "${reversed[@]}"); done
for round in $(seq 1 "$rounds"); do
    if (( round % 2 )); then order=("$@"); else order=("${reversed[@]}"); fi
    for bin in "${order[@]}"; do
        rm -rf "$work/run"; mkdir -p "$work/run/data"
        cp "$kept/bench.db" "$work/run/bench.db"
        install -m 600 "$kept/master.key" "$work/run/master.key"
        "$bin" serve --listen "127.0.0.1:$port" --log-level warn \
            --database-url "sqlite://$work/run/bench.db" --master-key-file "$work/run/master.key" \
            --data-dir "$work/run/data" --cache-capacity 10000 > "$work/run/server.log" 2>&1 &
        server=$!
        until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 0.2; done
        wrk -t1 -c32 -d3s "http://127.0.0.1:$port/health" > "$work/h1.txt"
        w0=$(writer_ms "$server")
        wrk -t1 -c32 -d"${seconds}s" -s "$kept/miss.lua" "http://127.0.0.1:$port/" > "$work/m.txt"
        w1=$(writer_ms "$server")
        wrk -t1 -c32 -d3s "http://127.0.0.1:$port/health" > "$work/h2.txt"
        sleep "$after"
        w2=$(writer_ms "$server")
        kill -TERM "$server"; wait "$server" || true
        h1=$(rate "$work/h1.txt"); m=$(rate "$work/m.txt"); h2=$(rate "$work/h2.txt")
        printf 'round %s  %-32s /health %s, %s  misses %s (%s %%)  writer ms: %s during, %s after\n' \
            "$round" "$bin" "$h1" "$h2" "$m" "$(awk -v m="$m" -v a="$h1" -v b="$h2" 'BEGIN {printf "%.1f", 200 * m / (a + b)}')" \
            "$((w1 - w0))" "$((w2 - w1))"
    done
done
