#!/usr/bin/env bash
# Re-runs the README's comparison grids one (algorithm, seed) at a time. Each finished run's
# metrics.jsonl and config.json are copied to results/<grid>/<algorithm>/seed<k>/, and a run whose
# copy already logs the last round is skipped, so a grid can be finished over several sessions or
# machines; the scratch run folders (with checkpoints) live under runs/grids/ and are never
# committed. `--tables` rewrites each grid's results.md, results.csv and curves.png from the committed
# metrics.jsonl alone (`compare --report_only`), over the algorithms whose three seeds are finished.
#
#   bash results/run_grids.sh            # every grid, in the order below
#   bash results/run_grids.sh rotten_tomatoes_new bbc_news_all    # only these grids, in this order
#   ONLY=fedex_lora,rolora bash results/run_grids.sh bbc_news_all  # only these algorithms
#   JOBS=2 bash results/run_grids.sh     # two runs at once, each pinned to its own core
#   bash results/run_grids.sh --tables bbc_news_all   # only the tables, from what has finished
#
# JOBS=N starts N workers that walk the same list; a worker takes a run by holding its lock file
# (flock, released when the worker stops, however it stops), so no run is taken twice. With N > 1
# worker i is pinned to core i mod nproc (taskset), so XLA gives each run one thread. On a 2-core
# machine (2026-12-06, AMD EPYC) a demo round took ~30 s with both cores and ~50 s pinned to one
# beside another pinned run: 1.2x the runs per hour. One XLA thread or two gave the same bits for
# matmuls of the demo's shapes (checked that day), and the first rounds of a run logged the same losses.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/grids/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
JOBS="${JOBS:-1}"
RECIPE="--config.fl.rounds=10 --config.eval_every=1"
# the four newer methods first: their rows are new evidence, the others re-runs
ALL="frlora,fedavg,ffa_lora,fedex_lora,rolora,fedsvd,hetlora,fedprox,scaffold,fedavgm,fedadagrad,fedyogi,fedadam,flora,flexlora,fedsa_lora,fedreg"
OFFICIAL="fedavgm,fedadagrad,fedyogi,fedadam"
HET="flora,flexlora,hetlora"
DP3="frlora,fedavg,ffa_lora"
DP="--config.dp.mode=sample --config.dp.delta=1e-5 --config.dp.clip_norm=1.0"

# grid | config | algorithms | extra flags; each grid's accuracy target (for "rounds to accuracy >= t")
# is 0.95 x the best non-private mean of its task, fixed so tables stay comparable as rows arrive
declare -A TARGET=([rotten_tomatoes]=0.636 [bbc_news]=0.857)
GRIDS=(  # in the order they run: the newer methods, DP and heterogeneous ranks first (issue evidence)
  "rotten_tomatoes_new|configs/demo.py|fedex_lora,rolora,fedsvd,hetlora|"
  "rotten_tomatoes_dp_eps8|configs/demo.py|$DP3|$DP --config.dp.target_epsilon=8"
  "rotten_tomatoes_dp_eps3|configs/demo.py|$DP3|$DP --config.dp.target_epsilon=3"
  "rotten_tomatoes_dp_eps1|configs/demo.py|$DP3|$DP --config.dp.target_epsilon=1"
  "rotten_tomatoes_hetranks|configs/demo.py|$HET|--config.fl.client_ranks=tiers:4,8,16"
  "bbc_news_all|configs/demo.py:bbc|$ALL|"
  "bbc_news_hetranks|configs/demo.py:bbc|$HET|--config.fl.client_ranks=tiers:4,8,16"
  "bbc_news_official|configs/demo.py:bbc|$OFFICIAL|--config.fl.server_rule=official"
  "rotten_tomatoes_all|configs/demo.py|$ALL|"
)

finished() {  # $1: metrics.jsonl; true when it logs round 10
  [[ -f "$1" ]] && python - "$1" <<'EOF'
import json, sys
sys.exit(0 if any(json.loads(l)["round"] == 10 for l in open(sys.argv[1]) if l.strip()) else 1)
EOF
}

if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then echo "JOBS=$JOBS: give a whole number of workers >= 1, e.g. JOBS=2" >&2; exit 2; fi
if (( JOBS > 1 )); then
  for tool in flock taskset; do
    command -v "$tool" >/dev/null || { echo "JOBS=$JOBS needs '$tool' (util-linux); install it or use JOBS=1" >&2; exit 2; }
  done
fi

tables_only=0
if [[ "${1:-}" == "--tables" ]]; then tables_only=1; shift; fi
selected=("$@")
if [[ ${#selected[@]} -eq 0 ]]; then
  for entry in "${GRIDS[@]}"; do selected+=("${entry%%|*}"); done
fi
target_of() {  # $1: grid; the accuracy target of the task its name starts with
  local task
  for task in "${!TARGET[@]}"; do [[ "$1" == "${task}_"* ]] && { echo "${TARGET[$task]}"; return 0; }; done
  echo "no accuracy target for grid '$1': add its task to TARGET" >&2; return 2
}

tabulate() {  # $1: grid, $2: config, $3: algorithms, $4: extra flags; the algorithms with every seed finished
  local grid=$1 config=$2 algorithms=$3 extra=$4 complete=() algorithm seed target
  for algorithm in ${algorithms//,/ }; do
    for seed in 0 1 2; do finished "results/$grid/$algorithm/seed$seed/metrics.jsonl" || continue 2; done
    complete+=("$algorithm")
  done
  if (( ${#complete[@]} == 0 )); then echo "$grid: no algorithm has all three seeds yet"; return 0; fi
  if [[ -f "results/$grid/results.csv" ]]; then  # never drop a row whose per-seed metrics are not committed
    for algorithm in $(tail -n +2 "results/$grid/results.csv" | cut -d, -f1); do
      if [[ ! " ${complete[*]} " =~ " $algorithm " ]]; then
        echo "$grid: left as it is; its table has $algorithm, whose three seeds are not all in results/$grid/" >&2
        return 0
      fi
    done
  fi
  target=$(target_of "$grid")
  local names="${complete[*]}"
  # shellcheck disable=SC2086
  python -m frlora_jax.compare --config "$config" --algorithms "${names// /,}" --seeds 0,1,2 \
    --workdir "results/$grid" $RECIPE $extra --report_only --target="$target"
}

runs=()  # "grid|config|algorithm|seed|extra", in the order they run
for wanted in "${selected[@]}"; do
  entry=""
  for candidate in "${GRIDS[@]}"; do [[ "${candidate%%|*}" == "$wanted" ]] && entry="$candidate"; done
  if [[ -z "$entry" ]]; then echo "unknown grid '$wanted'; grids: ${GRIDS[*]%%|*}" >&2; exit 2; fi
  IFS='|' read -r grid config algorithms extra <<<"$entry"
  if (( tables_only )); then tabulate "$grid" "$config" "$algorithms" "$extra"; continue; fi
  for algorithm in ${algorithms//,/ }; do
    if [[ -n "${ONLY:-}" && ! ",$ONLY," =~ ",$algorithm," ]]; then continue; fi
    for seed in 0 1 2; do runs+=("$grid|$config|$algorithm|$seed|$extra"); done
  done
done
if (( tables_only )); then exit 0; fi

run_one() {  # one (grid, algorithm, seed): run it unless its copy is finished, then copy it
  local grid=$1 config=$2 algorithm=$3 seed=$4 extra=$5 pin=("${@:6}")
  local keep="results/$grid/$algorithm/seed$seed"
  if finished "$keep/metrics.jsonl"; then return 0; fi
  if (( ${#pin[@]} )); then echo "[${pin[*]}] $grid: $algorithm seed $seed"; fi
  # shellcheck disable=SC2086
  "${pin[@]}" python -m frlora_jax.compare --config "$config" --algorithms "$algorithm" --seeds "$seed" \
    --workdir "runs/grids/$grid" $RECIPE $extra
  mkdir -p "$keep"
  cp "runs/grids/$grid/$algorithm/seed$seed/metrics.jsonl" "runs/grids/$grid/$algorithm/seed$seed/config.json" "$keep/"
}

worker() {  # $1: worker index; walks every run, taking those no other worker holds
  local index=$1 pin=() lock fd
  if (( JOBS > 1 )); then pin=(taskset -c "$(( index % $(nproc) ))"); fi
  mkdir -p runs/grids/locks
  for run in "${runs[@]}"; do
    IFS='|' read -r grid config algorithm seed extra <<<"$run"
    if (( JOBS == 1 )); then run_one "$grid" "$config" "$algorithm" "$seed" "$extra"; continue; fi
    lock="runs/grids/locks/$grid.$algorithm.seed$seed"
    exec {fd}>"$lock"
    if flock -n "$fd"; then
      run_one "$grid" "$config" "$algorithm" "$seed" "$extra" "${pin[@]}"
    fi
    exec {fd}>&-
  done
}

if (( JOBS == 1 )); then worker 0; exit; fi
pids=()
for (( index = 0; index < JOBS; index++ )); do worker "$index" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
