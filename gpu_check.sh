#!/usr/bin/env bash
# The GPU check (issue #15): on one GPU, in under 8 minutes, it runs
#   1. --bench on the paper's conv4 workload and the paper's cell (meta-step: batched vs the per-task loop),
#   2. --bench overhead (loop against batched where arithmetic is next to nothing: launches alone),
#   3. --bench search (the default search's candidates per minute, 1 worker and the default workers),
#   4. a small search twice, and checks that both logs are the same,
#   5. a train, resume and eval round trip, checked against one uninterrupted training,
# then prints a summary. It installs nothing and writes only under OUT (default: a new folder in /tmp).
#
#   ./gpu_check.sh [OUT]                                  # on a CUDA machine
#   DEVICE=cpu BENCH_PRESET=tiny ./gpu_check.sh [OUT]     # the same steps on a CPU, to try the script
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
BENCH_PRESET=${BENCH_PRESET:-paper}
OUT=${1:-$(mktemp -d /tmp/autometa-gpu-check.XXXXXX)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
SEARCH=(--blocks 2 --beam 3 --max-first 8 --probe 1 --noise 1 --rescore 2 --rescore-seeds 1 --meta-iters 30
        --eval-episodes 20 --device "$DEVICE")
TRAIN=(--device "$DEVICE" --val-every 20 --val-episodes 20 --eval-episodes 50 --log-every 20)

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it to OUT/NAME.log, record the outcome
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    printf '%-14s %-7s %4d s\n' "$name" "$([ $status -eq 0 ] && echo ok || echo "FAIL($status)")" \
        $((SECONDS - start)) >> "$SUMMARY"
    return $status
}

# The same log records (but the clock) and the same best cell in two search folders.
SAME_SEARCH='
import json, sys
def log(out):
    return sorted(json.dumps({k: v for k, v in json.loads(line).items() if k != "seconds"}, sort_keys=True)
                  for line in open(f"{out}/search.jsonl"))
def best(out):
    b = json.load(open(f"{out}/best.json"))
    return b["cell"], b["accuracy"], b["rescore"]
a, b = sys.argv[1:]
print(f"{len(log(a))} records each; logs equal: {log(a) == log(b)}; best equal: {best(a) == best(b)}")
sys.exit(0 if log(a) == log(b) and best(a) == best(b) else 1)'
# The same iteration and weights in two checkpoints.
SAME_WEIGHTS='
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:])
steps = a["iteration"], b["iteration"]
same = steps[0] == steps[1] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
print(f"iterations {steps}; same weights: {same}")
sys.exit(0 if same else 1)'

"$PYTHON" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/machine.txt"
step bench-conv4 150 "$PYTHON" autometa.py --bench conv4 --preset "$BENCH_PRESET" --device "$DEVICE"
step bench-cell 200 "$PYTHON" autometa.py --bench cell --preset "$BENCH_PRESET" --device "$DEVICE"
step bench-overhead 120 "$PYTHON" autometa.py --bench overhead --device "$DEVICE"  # 1 inner step: a minute
step bench-search 400 "$PYTHON" autometa.py --bench search --device "$DEVICE"
step search-1 150 "$PYTHON" autometa.py --search "${SEARCH[@]}" --out "$OUT/search-1"
step search-2 150 "$PYTHON" autometa.py --search "${SEARCH[@]}" --out "$OUT/search-2"
step same-search 30 "$PYTHON" -c "$SAME_SEARCH" "$OUT/search-1" "$OUT/search-2"
step train-whole 90 "$PYTHON" autometa.py --train conv4 "${TRAIN[@]}" --train-iters 40 --out "$OUT/whole"
step train-part 90 "$PYTHON" autometa.py --train conv4 "${TRAIN[@]}" --train-iters 20 --out "$OUT/parts"
step train-resume 90 "$PYTHON" autometa.py --train conv4 "${TRAIN[@]}" --train-iters 40 --out "$OUT/parts"
step same-weights 30 "$PYTHON" -c "$SAME_WEIGHTS" "$OUT/whole/last.pt" "$OUT/parts/last.pt"
step eval-whole 60 "$PYTHON" autometa.py --eval "$OUT/whole/last.pt"
step eval-parts 60 "$PYTHON" autometa.py --eval "$OUT/parts/last.pt"
step same-eval 5 cmp "$OUT/eval-whole.log" "$OUT/eval-parts.log"

echo
echo "== summary ($OUT)"
cat "$OUT/machine.txt"
cat "$SUMMARY"
grep -h -E "^ *(conv4|autometa cell).*x$|meta-gradient, first task|operations per|candidates/min|^search candidate|so about" \
    "$OUT"/bench-*.log
grep -h -E "^resuming|logs equal|same weights|^test accuracy" "$OUT"/same-*.log "$OUT"/train-resume.log \
    "$OUT"/eval-*.log
! grep -q FAIL "$SUMMARY"
