#!/usr/bin/env bash
# Run `prockd train` for each line of overrides in $1 (one run per line), two at a time, one thread each.
# Usage: scripts/sweep.sh LINES_FILE OUT_DIR BASE_CONFIG
set -u
lines=$1; out=$2; base=$3
mkdir -p "$out"
n=0
while IFS= read -r ov; do
  [ -z "$ov" ] && continue
  name=$(echo "$ov" | tr ' =/[],:{}' '_______' | cut -c1-120)
  ( OMP_NUM_THREADS=1 .venv/bin/prockd train --config "$base" --out "$out/$name" train.num_threads=1 train.progress=false $ov \
      > "$out/$name.log" 2>&1 ) &
  n=$((n+1))
  if [ $((n % 2)) -eq 0 ]; then wait; fi
done < "$lines"
wait
for d in "$out"/*/; do
  [ -f "$d/final.json" ] && python3 -c "
import json,sys; f=json.load(open('$d/final.json'))['final']
print(f\"{f.get('test/deployed',0):6.2f} aug={f.get('test/aug',0):6.2f} avg={f.get('test/avg',0):6.2f} $(basename $d)\")"
done
