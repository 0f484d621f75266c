#!/usr/bin/env bash
# Run a command while sampling every process's resident memory once a second; print the
# largest processes' peaks at the end.
#   bench/peak_memory.sh make demo
set -u
log=$(mktemp)
( while true; do ps -eo rss=,args= >> "$log"; sleep 1; done ) &
sampler=$!
"$@"
status=$?
kill $sampler
echo "== peak resident memory (MB) by command, top 6"
awk '{rss=$1; $1=""; cmd=substr($0, 2, 90); if (rss > peak[cmd]) peak[cmd]=rss}
     END {for (c in peak) printf "%8.0f  %s\n", peak[c]/1024, c}' "$log" | sort -rn | head -6
rm -f "$log"
exit $status
