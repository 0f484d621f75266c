#!/bin/bash
# bench/gpu_flow.py on the lent GPU host (docs/GPU.md, "The whole flow on one GPU"). A command
# there lasts 10 minutes at most and the run takes longer: `start` launches it in a session of
# its own (it outlives the command while the host is held), `follow` waits on it; each call
# copies what it has written so far to $OUT.
#   bash bench/gpu_flow.sh start [seconds]     # after the carry transfers (the sites in /tmp)
#   bash bench/gpu_flow.sh follow [seconds]
T=/tmp
W=$T/gf
if [ "$1" = start ]; then
  rm -rf "$W" && mkdir -p "$W"
  PYTHONPATH=$T/site-orch setsid nohup python3 bench/gpu_flow.py --work "$W" --out "$W/flow.json" \
    --orch-path $T/site-orch --quant-path $T/site-quant --serve-path $T/site-serve:$T/site-stream:$T/stubs-serve \
    ${GPU_FLOW_ARGS:-} >"$W/bench.log" 2>&1 </dev/null &
fi
end=$((SECONDS + ${2:-540}))
while [ $SECONDS -lt $end ] && ! grep -q '"ended"' "$W/flow.json" 2>/dev/null \
  && pgrep -f "[b]ench/gpu_flow.py" >/dev/null; do
  sleep 10
done
cp "$W/flow.json" "$OUT/" 2>/dev/null
tail -c 3000000 "$W/bench.log" >"$OUT/bench.log" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$W/state" logs 2>/dev/null
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
grep -o '"ok": [a-z]*' "$W/flow.json" 2>/dev/null | sort | uniq -c
tail -5 "$W/bench.log"
