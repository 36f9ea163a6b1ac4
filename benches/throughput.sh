#!/usr/bin/env bash
# Throughput, CPU per alert, peak memory and latency of ztfhook beside its
# baselines, in one run on one machine:
#   raw consume (plain rdkafka), raw publish (Google's publisher alone),
#   the minimal correct bridge on the same two libraries
#   (benches/tools/minimal_bridge.rs: the ceiling for any such bridge),
#   ztfhook with the pass-through, a Rhai and a Lua routing hook, an
#   alert-decoding hook, and the discard sink, and a Python bridge
#   (confluent-kafka + google-cloud-pubsub), on the same loads:
#   the 23 ZTF samples replicated to 20,010 alerts, and the four 110-127 KB
#   Rubin samples replicated to 10,000; then a latency run at a steady
#   1,000 alerts/s, ztfhook on tansu (sqlite) as the correct-but-slow
#   reference, and `ztfhook replay` of a ~1 GB nightly tarball (the ZTF
#   samples repeated), gzip and plain tar: the difference is the cost of
#   inflating it.
# The broker for throughput is librdkafka's mock cluster in its own process
# (benches/tools/mock_broker.rs); its CPU is recorded beside each figure.
# Results: benches/results/throughput.md and .csv (every repetition in
# throughput-reps.csv).
#
#   benches/throughput.sh            # about 10 minutes after the builds
# Sections not in the default run (SECTIONS="..."): destinations (JSON and
# archive beside the raw topic), hotpath (issue 14's table: every baseline,
# this build with its default workers and with 2, BEFORE_BIN's build, the fan-out to 1, 10
# and 100 topics, REPS interleaved repetitions), profile (perf of the ZTF
# pass-through into benches/results/profile-ztf.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N_ZTF=${N_ZTF:-870}      # copies of the 23 ZTF samples: 20,010 alerts
N_RUBIN=${N_RUBIN:-2500} # copies of the 4 Rubin samples: 10,000 alerts
PARTITIONS=400           # >= messages x size / 5 MB (the mock keeps 5 MB a partition)
LAT_RATE=1000
LAT_SECONDS=10
TANSU_N=2000
REPLAY_COPIES=${REPLAY_COPIES:-1000} # copies of the 23 ZTF samples in the tarball: ~1 GB
# Another build of ztfhook to measure: an A/B of two commits on one machine
# (ZTFHOOK_BIN=/path/to/old/ztfhook SECTIONS=ztf benches/throughput.sh).
ZTFHOOK_BIN=${ZTFHOOK_BIN:-target/release/ztfhook}
# The hotpath section's "before" rows, interleaved with this build's in one
# run: BEFORE_BIN=/path/to/old/ztfhook SECTIONS=hotpath benches/throughput.sh
BEFORE_BIN=${BEFORE_BIN:-}
FANOUT_COPIES=${FANOUT_COPIES:-20} # copies of the 23 ZTF samples fanned out: 460 alerts

scripts/setup.sh
command -v /usr/bin/time >/dev/null || { echo "bench: needs /usr/bin/time (package time)" >&2; exit 1; }
echo "bench: building (release)" >&2
cargo build --release --locked --bin ztfhook --examples >/dev/null 2>&1 ||
  cargo build --release --locked --bin ztfhook --examples
PYENV=${ZTFHOOK_CACHE:-$HOME/.cache/ztfhook}/pybench
if [[ ! -x $PYENV/bin/python ]] || ! "$PYENV/bin/python" -c 'import confluent_kafka, google.cloud.pubsub' 2>/dev/null; then
  echo "bench: installing confluent-kafka and google-cloud-pubsub into $PYENV" >&2
  python3 -m venv "$PYENV"
  "$PYENV/bin/pip" install -q confluent-kafka google-cloud-pubsub
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ztfhook-bench.XXXXXX")
MOCK_PID=""
cleanup() {
  [[ -n $MOCK_PID ]] && kill "$MOCK_PID" 2>/dev/null || true
  scripts/services.sh stop "$WORK/services" || true
}
trap cleanup EXIT
scripts/services.sh start "$WORK/services"
# shellcheck disable=SC1091
source "$WORK/services/env"
PROJECT=ztfhook-bench
EMU=http://$PUBSUB_EMULATOR_HOST/v1/projects/$PROJECT
X=target/release/examples

target/release/examples/mock_broker ztf_20260101_programid1:$PARTITIONS lsst-alerts-v9:$PARTITIONS ztf_20260102_programid1:$PARTITIONS ztf-fanout:16 >"$WORK/mock.out" 2>"$WORK/mock.err" &
MOCK_PID=$!
for _ in $(seq 100); do grep -q bootstrap= "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
MOCK=$(sed -n 's/^bootstrap=//p' "$WORK/mock.out")
echo "bench: mock broker at $MOCK" >&2
want() { [[ " ${SECTIONS:-ztf rubin latency tansu replay} " == *" $1 "* ]]; }
if want ztf || want destinations || want hotpath || want profile; then
  $X/load_alerts --bootstrap "$MOCK" --topic ztf_20260101_programid1 --partitions $PARTITIONS --copies "$N_ZTF" tests/data/alerts/ztf >&2
fi
{ want rubin || want destinations || want hotpath; } && $X/load_alerts --bootstrap "$MOCK" --topic lsst-alerts-v9 --partitions $PARTITIONS --copies "$N_RUBIN" \
  tests/data/alerts/rubin/lsst_v9_0_wire_*.avro >&2
ZTF_N=$((23 * N_ZTF))
RUBIN_N=$((4 * N_RUBIN))
ZTF_MB=$(du -cb tests/data/alerts/ztf/*.avro | tail -1 | awk -v c="$N_ZTF" '{printf "%.1f", $1 * c / 1e6}')
RUBIN_MB=$(du -cb tests/data/alerts/rubin/lsst_v9_0_wire_*.avro | tail -1 | awk -v c="$N_RUBIN" '{printf "%.1f", $1 * c / 1e6}')

calc() { awk "BEGIN { printf \"%.2f\", $* }"; }
ticks=$(getconf CLK_TCK)
cpu_of() { # seconds of user+sys CPU a process has used so far
  awk -v t="$ticks" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat" 2>/dev/null || echo 0
}
pubsub_topic() { # NAME [subscribe]; an existing topic is fine
  curl -s -o /dev/null -X PUT "$EMU/topics/$1"
  if [[ ${2:-} == subscribe ]]; then
    curl -s -o /dev/null -X PUT "$EMU/subscriptions/$1-sub" -H 'content-type: application/json' \
      -d "{\"topic\": \"projects/$PROJECT/topics/$1\"}" >/dev/null
  fi
}

# The topics the example hooks route to.
for t in ztf-public ztf-sampled ztf-partnership ztf-caltech lsst-solar-system lsst-static; do
  pubsub_topic "$t"
done

CSV=$WORK/results.csv
EMU_PID=$(pgrep -f "java.*--port=${PUBSUB_EMULATOR_HOST##*:}" | head -1)
EMU0=0
echo "run,broker,alerts,MB,seconds,alerts_per_s,MB_per_s,cpu_s_per_1000,peak_rss_MB,broker_cpu_s,emulator_cpu_s,p50_ms,p99_ms" >"$CSV"
mark() { EMU0=$(cpu_of "$EMU_PID"); }
record() { # RUN BROKER ALERTS MB SECONDS CPU RSS_KB BROKER_CPU [P50 P99]
  local ec
  ec=$(calc "$(cpu_of "$EMU_PID") - $EMU0")
  awk -v r="$1" -v b="$2" -v n="$3" -v mb="$4" -v s="$5" -v cpu="$6" -v rss="$7" -v bc="$8" -v ec="$ec" \
      -v p50="${9:--}" -v p99="${10:--}" 'BEGIN {
    printf "%s,%s,%d,%.1f,%.2f,%.0f,%.1f,%.3f,%.0f,%.2f,%.2f,%s,%s\n", r, b, n, mb, s, n / s, mb / s,
      cpu / n * 1000, rss / 1024, bc, ec, p50, p99 }' >>"$CSV"
  tail -1 "$CSV" >&2
}

timed() { # OUTFILE CMD...: runs CMD under /usr/bin/time; prints "wall user sys maxrss_kb"
  local out=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$out.time" "$@" >"$out.out" 2>"$out.err"
  cat "$out.time" | tail -1
}

run_raw_consume() { # TOPIC N MB
  local b0 t
  mark
  b0=$(cpu_of "$MOCK_PID")
  t=$(timed "$WORK/raw-consume-$1" $X/raw_consume "$MOCK" "$1" "$2")
  read -r wall user sys rss <<<"$t"
  secs=$(awk '{print $3}' "$WORK/raw-consume-$1.out")
  record "raw consume ($1)" mock "$2" "$3" "$secs" "$(calc "$user + $sys")" "$rss" \
    "$(calc "$(cpu_of "$MOCK_PID") - $b0")"
}

run_raw_publish() { # NAME N MB FILES...
  local name=$1 n=$2 mb=$3; shift 3
  pubsub_topic "raw-$name"
  mark
  t=$(timed "$WORK/raw-publish-$name" $X/raw_publish $PROJECT "raw-$name" "$n" "$@")
  read -r wall user sys rss <<<"$t"
  secs=$(awk '{print $3}' "$WORK/raw-publish-$name.out")
  record "raw publish ($name)" - "$n" "$mb" "$secs" "$(calc "$user + $sys")" "$rss" 0
}

# run_ztfhook RUN BOOTSTRAP TOPIC N MB [script=FILE] [sink=discard] [subscribe]
#   [bin=ZTFHOOK] [workers=N] [fanout=TOPICS] [perf=OUT] [json] [archive=TEMPLATE] [tansu] [loader=CMD]
run_ztfhook() {
  local run=$1 bootstrap=$2 topic=$3 n=$4 mb=$5; shift 5
  local script="" sink=pubsub subscribe="" broker_pid=$MOCK_PID broker=mock loader="" loader_pid="" json="" archive=""
  local bin=$ZTFHOOK_BIN workers="" fanout="" perf=""
  for a in "$@"; do
    case $a in
      perf=*) perf=${a#perf=} ;;
      bin=*) bin=${a#bin=} ;;
      workers=*) workers=${a#workers=} ;;
      fanout=*) fanout=${a#fanout=} ;;
      script=*) script=${a#script=} ;;
      sink=*) sink=${a#sink=} ;;
      subscribe) subscribe=subscribe ;;
      tansu) broker_pid=$(pgrep -f "tansu.*$ZTFHOOK_TEST_BOOTSTRAP" | head -1); broker=tansu ;;
      loader=*) loader=${a#loader=} ;;
      json) json=1 ;;
      archive=*) archive=${a#archive=} ;;
    esac
  done
  local id ps port cfg
  id=$(echo "$run" | tr -c 'a-z0-9\n' '-' | tr -s '-')
  ps=bench-$id
  pubsub_topic "$ps" $subscribe
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cfg=$WORK/$id.toml
  cat >"$cfg" <<EOF
[kafka]
bootstrap.servers = "$bootstrap"
group.id = "bench-$id-$RANDOM"
topics = ["$topic"]
"fetch.wait.max.ms" = 10

[pubsub]
project = "$PROJECT"
topic = "$ps"

[pipeline]
sink = "$sink"
stats_interval_ms = 0

[alerts]
schema_dir = "$ROOT/tests/data/schemas/lsst"

[metrics]
listen = "127.0.0.1:$port"
EOF
  if [[ -n $workers ]]; then sed -i "s/^\[pipeline\]$/[pipeline]\nworkers = $workers/" "$cfg"; fi
  if [[ -n $fanout ]]; then
    # A hook that sends every alert to FANOUT topics.
    local names="" i
    for i in $(seq "$fanout"); do
      pubsub_topic "$ps-fan-$i"
      names+="\"$ps-fan-$i\", "
    done
    printf 'fn route(msg) {\n    #{ topics: [%s] }\n}\n' "${names%, }" >"$WORK/$id.rhai"
    printf '\n[hook]\nscript = "%s"\n' "$WORK/$id.rhai" >>"$cfg"
  fi
  if [[ -n $script ]]; then printf '\n[hook]\nscript = "%s"\n' "$ROOT/$script" >>"$cfg"; fi
  # Beside the raw topic: the BigQuery JSON form to a second topic, and
  # (archive=TEMPLATE) every alert to an object in fake-gcs-server.
  local defaults='"@default"'
  if [[ -n $json ]]; then
    pubsub_topic "$ps-json"
    printf '\n[bigquery]\ntopics = ["%s"]\nkafka_columns = true\n' "$ps-json" >>"$cfg"
    defaults+=", \"$ps-json\""
  fi
  if [[ -n $archive ]]; then
    local bucket=${ps%%-}
    bucket=${bucket%-}
    curl -sf -X POST -H 'content-type: application/json' -d "{\"name\":\"$bucket\"}" \
      "$STORAGE_EMULATOR_HOST/storage/v1/b?project=$PROJECT" >/dev/null
    printf '\n[storage]\nbucket = "%s"\nobject = "%s"\n' "$bucket" "$archive" >>"$cfg"
    defaults+=', "@archive"'
  fi
  printf '\n[destinations]\ndefault = [%s]\n' "$defaults" >>"$cfg"
  local b0 start="" pid done_at
  mark
  b0=$(cpu_of "$broker_pid")
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/$id.time" "$bin" --config "$cfg" \
    >"$WORK/$id.out" 2>"$WORK/$id.log" &
  pid=$!
  local perf_pid=""
  if [[ -n $perf ]]; then
    # Sampled on the CPU while it runs: ztfhook itself, the child of time.
    local zpid=""
    for _ in $(seq 100); do zpid=$(pgrep -P $pid | head -1); [[ -n $zpid ]] && break; sleep 0.05; done
    perf record -q -F 999 -g --call-graph dwarf,16384 -p "$zpid" -o "$perf" 2>"$WORK/$id.perf.err" &
    perf_pid=$!
  fi
  # Timed from the first alert consumed (the group join, ~3 s on the mock,
  # is left out, as the baselines leave it out) until every alert is
  # consumed and acknowledged (in flight 0).
  while :; do
    page=$(curl -sf "http://127.0.0.1:$port/metrics" || true)
    consumed=$(awk '$1 == "ztfhook_consumed_messages_total" {print $2}' <<<"$page")
    inflight=$(awk '$1 == "ztfhook_in_flight_messages" {print $2}' <<<"$page")
    # A paced load starts once ztfhook owns its partitions, so the group
    # join is not counted as latency.
    assigned=$(awk '$1 == "ztfhook_assigned_partitions" {print $2}' <<<"$page")
    if [[ -n $loader && -z $loader_pid && ${assigned:-0} -gt 0 ]]; then
      $loader >"$WORK/$id.loader.out" 2>&1 &
      loader_pid=$!
    fi
    if [[ -z $start && ${consumed:-0} -gt 0 ]]; then start=$(date +%s.%N); fi
    if [[ ${consumed:-0} -ge $n && ${inflight:-1} -eq 0 ]]; then break; fi
    if ! kill -0 $pid 2>/dev/null; then echo "bench: $run: ztfhook exited" >&2; tail "$WORK/$id.log" >&2; exit 1; fi
    sleep 0.02
  done
  done_at=$(date +%s.%N)
  if [[ -n $perf_pid ]]; then kill -INT $perf_pid; wait $perf_pid || true; fi
  local bc
  bc=$(calc "$(cpu_of "$broker_pid") - $b0")
  if [[ -n $loader_pid ]]; then wait "$loader_pid" || true; fi
  # SIGTERM to ztfhook itself (the child of /usr/bin/time, which would die
  # of the signal and leave it running).
  pkill -TERM -P $pid; wait $pid || true
  read -r wall user sys rss <"$WORK/$id.time"
  local p50="-" p99="-"
  if [[ -n $subscribe ]]; then
    read -r got distinct p50 p99 < <($X/pubsub_latency "projects/$PROJECT/subscriptions/$ps-sub" "$n")
    echo "bench: $run: received $got ($distinct distinct)" >&2
  fi
  record "$run" "$broker" "$n" "$mb" "$(calc "$done_at - $start")" "$(calc "$user + $sys")" "$rss" "$bc" "$p50" "$p99"
}

run_python() { # RUN TOPIC N MB
  local run=$1 topic=$2 n=$3 mb=$4 id ps
  id=$(echo "$run" | tr -c 'a-z0-9\n' '-' | tr -s '-')
  ps=bench-$id
  pubsub_topic "$ps"
  local b0
  mark
  b0=$(cpu_of "$MOCK_PID")
  t=$(timed "$WORK/$id" "$PYENV/bin/python" benches/python_bridge.py "$MOCK" "$topic" "py-$id-$RANDOM" $PROJECT "$ps" "$n")
  read -r wall user sys rss <<<"$t"
  # The bridge prints its seconds from the first message to the last commit.
  record "$run" mock "$n" "$mb" "$(tail -1 "$WORK/$id.out")" "$(calc "$user + $sys")" "$rss" "$(calc "$(cpu_of "$MOCK_PID") - $b0")"
}

run_minimal() { # RUN TOPIC N MB: the minimal correct bridge on the same libraries
  local run=$1 topic=$2 n=$3 mb=$4 id ps b0
  id=$(echo "$run" | tr -c 'a-z0-9\n' '-' | tr -s '-')
  ps=bench-$id
  pubsub_topic "$ps"
  mark
  b0=$(cpu_of "$MOCK_PID")
  t=$(timed "$WORK/$id" $X/minimal_bridge "$MOCK" "$topic" "min-$id-$RANDOM" $PROJECT "$ps" "$n")
  read -r wall user sys rss <<<"$t"
  secs=$(awk '{print $3}' "$WORK/$id.out")
  record "$run" mock "$n" "$mb" "$secs" "$(calc "$user + $sys")" "$rss" "$(calc "$(cpu_of "$MOCK_PID") - $b0")"
}

REPS=${REPS:-3}
SECTIONS=${SECTIONS:-ztf rubin latency tansu replay}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# rep CMD...: runs a measurement REPS times and keeps the median row (by
# alerts/s): the emulator's speed varies from run to run.
# The median of REPS rows on stdin, by alerts/s.
median_row() { sort -t, -k6 -n | sed -n "$(( (REPS + 1) / 2 ))p"; }
rep() {
  local all=$CSV
  CSV=$WORK/rep.csv
  : >"$CSV"
  for _ in $(seq "$REPS"); do "$@"; done
  cat "$CSV" >>"$WORK/reps.csv"
  median_row <"$CSV" >>"$all"
  CSV=$all
}
head -1 "$CSV" >"$WORK/reps.csv"

if want ztf || want rubin || want destinations || want hotpath || want profile; then
echo "bench: warming the emulator up (not recorded)" >&2
run_raw_publish warmup "$ZTF_N" "$ZTF_MB" tests/data/alerts/ztf
: >"$WORK/warm.csv"; head -1 "$CSV" >"$WORK/warm.csv"; mv "$WORK/warm.csv" "$CSV"

fi
if want ztf; then
echo "bench: ZTF load, $ZTF_N alerts, $ZTF_MB MB" >&2
rep run_raw_consume ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB"
rep run_raw_publish ztf "$ZTF_N" "$ZTF_MB" tests/data/alerts/ztf
rep run_minimal "minimal bridge (ztf)" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB"
rep run_ztfhook "ztfhook discard sink" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" sink=discard
rep run_ztfhook "ztfhook pass-through" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB"
rep run_ztfhook "ztfhook Rhai routing" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" script=scripts/ztf_route_sample.rhai
rep run_ztfhook "ztfhook Lua routing" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" script=scripts/ztf_route_sample.lua
rep run_ztfhook "ztfhook decoding (ztf_by_program.rhai)" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" script=scripts/ztf_by_program.rhai
rep run_python "Python bridge (ztf)" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB"

fi
if want rubin; then
echo "bench: Rubin load, $RUBIN_N alerts, $RUBIN_MB MB" >&2
rep run_raw_consume lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB"
rep run_raw_publish rubin "$RUBIN_N" "$RUBIN_MB" tests/data/alerts/rubin/lsst_v9_0_wire_169298432645136561.avro \
  tests/data/alerts/rubin/lsst_v9_0_wire_169298432742653968.avro \
  tests/data/alerts/rubin/lsst_v9_0_wire_169298432757858307.avro \
  tests/data/alerts/rubin/lsst_v9_0_wire_169298432774111247.avro
rep run_minimal "minimal bridge (rubin)" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB"
rep run_ztfhook "ztfhook pass-through (rubin)" "$MOCK" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB"
rep run_ztfhook "ztfhook decoding (lsst_solar_system.rhai)" "$MOCK" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB" script=scripts/lsst_solar_system.rhai
rep run_python "Python bridge (rubin)" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB"

fi
if want destinations; then
# One Kafka connection, every destination (issue 15's recipe), beside the
# pass-through of the same run: the raw topic plus the BigQuery JSON topic,
# then plus the archive in Cloud Storage (fake-gcs-server, in memory).
GCS_PID=$(pgrep -f "fake-gcs-server.*${STORAGE_EMULATOR_HOST##*:}" | head -1)
echo "bench: destinations, ZTF and Rubin" >&2
rep run_ztfhook "ztfhook pass-through (destinations run)" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB"
rep run_ztfhook "ztfhook raw + BigQuery JSON" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" json
g0=$(cpu_of "$GCS_PID")
rep run_ztfhook "ztfhook raw + JSON + archive" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" json \
  "archive={kafka.topic}/{objectId}/{candid}.avro"
echo "bench: fake-gcs-server CPU during the ZTF archive run: $(calc "$(cpu_of "$GCS_PID") - $g0") s" >&2
rep run_ztfhook "ztfhook pass-through (rubin; destinations run)" "$MOCK" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB"
rep run_ztfhook "ztfhook raw + BigQuery JSON (rubin)" "$MOCK" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB" json
g0=$(cpu_of "$GCS_PID")
rep run_ztfhook "ztfhook raw + JSON + archive (rubin)" "$MOCK" lsst-alerts-v9 "$RUBIN_N" "$RUBIN_MB" json \
  "archive={kafka.topic}/{diaSource.diaObjectId}/{diaSource.diaSourceId}.avro"
echo "bench: fake-gcs-server CPU during the Rubin archive run: $(calc "$(cpu_of "$GCS_PID") - $g0") s" >&2

fi
if want hotpath; then
# Issue 14's table: the baselines, the minimal correct bridge, the build
# before the change (BEFORE_BIN) and this one, with its default workers
# and with two, then the cost as a hook fans every alert out to 1, 10 and 100
# topics. Each repetition runs every row once, so a slower spell of the
# machine falls on all of them; the median row (by alerts/s) of each is kept.
echo "bench: hot path, ZTF and Rubin, $REPS repetitions" >&2
RUBIN_FILES=(tests/data/alerts/rubin/lsst_v9_0_wire_*.avro)
FAN_N=$((23 * FANOUT_COPIES))
FAN_MB=$(du -cb tests/data/alerts/ztf/*.avro | tail -1 | awk -v c="$FANOUT_COPIES" '{printf "%.1f", $1 * c / 1e6}')
$X/load_alerts --bootstrap "$MOCK" --topic ztf-fanout --partitions 16 --copies "$FANOUT_COPIES" tests/data/alerts/ztf >&2
hot_rows() {
  local survey topic n mb files sfx
  for survey in ztf rubin; do
    if [[ $survey == ztf ]]; then
      topic=ztf_20260101_programid1 n=$ZTF_N mb=$ZTF_MB files=(tests/data/alerts/ztf) sfx=""
    else
      topic=lsst-alerts-v9 n=$RUBIN_N mb=$RUBIN_MB files=("${RUBIN_FILES[@]}") sfx=" (rubin)"
    fi
    run_raw_consume "$topic" "$n" "$mb"
    run_raw_publish "$survey" "$n" "$mb" "${files[@]}"
    run_minimal "minimal bridge ($survey)" "$topic" "$n" "$mb"
    if [[ -n $BEFORE_BIN ]]; then
      run_ztfhook "ztfhook pass-through before$sfx" "$MOCK" "$topic" "$n" "$mb" "bin=$BEFORE_BIN"
    fi
    run_ztfhook "ztfhook pass-through$sfx" "$MOCK" "$topic" "$n" "$mb"
    run_ztfhook "ztfhook pass-through 2 workers$sfx" "$MOCK" "$topic" "$n" "$mb" workers=2
    run_python "Python bridge ($survey)" "$topic" "$n" "$mb"
  done
  local topics
  for topics in 1 10 100; do
    if [[ -n $BEFORE_BIN ]]; then
      run_ztfhook "ztfhook fan-out to $topics topics before (ztf)" "$MOCK" ztf-fanout "$FAN_N" "$FAN_MB" "fanout=$topics" "bin=$BEFORE_BIN"
    fi
    run_ztfhook "ztfhook fan-out to $topics topics (ztf)" "$MOCK" ztf-fanout "$FAN_N" "$FAN_MB" "fanout=$topics"
  done
}
all=$CSV
CSV=$WORK/hot.csv
: >"$CSV"
for _ in $(seq "$REPS"); do hot_rows; done
cat "$CSV" >>"$WORK/reps.csv"
# The median row of each run, in the order they ran.
cut -d, -f1 "$CSV" | awk '!seen[$0]++' | while read -r row; do
  awk -F, -v r="$row" '$1 == r' "$CSV" | median_row
done >>"$all"
CSV=$all

fi
if want profile; then
# Where the pass-through's CPU goes (ZTF, one run, not in the table): perf
# samples ztfhook from the group join to the last acknowledgement; the
# report lists functions by their own share of the samples (children
# folded in their callers are in perf.data). Needs perf (linux-perf).
echo "bench: profile of the ZTF pass-through" >&2
command -v perf >/dev/null || { echo "bench: profile needs perf (apt-get install linux-perf)" >&2; exit 1; }
all=$CSV
CSV=$WORK/profiled.csv
head -1 "$all" >"$CSV"
run_ztfhook "ztfhook pass-through profiled" "$MOCK" ztf_20260101_programid1 "$ZTF_N" "$ZTF_MB" "perf=$WORK/perf.data"
CSV=$all
{
  echo "# perf: ztfhook pass-through (ZTF, $ZTF_N alerts), $(date -u +%Y-%m-%d)"
  echo "# own time (self), by library and function"
  perf report -i "$WORK/perf.data" --no-children -g none --sort dso,symbol --stdio --percent-limit 0.7 2>/dev/null |
    grep -E '^ +[0-9]' | sed -e 's/[ -]*$//' -n -e '1,45p' || true
  echo "# with callees (children), by function"
  perf report -i "$WORK/perf.data" --children -g none --sort symbol --stdio --percent-limit 3 2>/dev/null |
    grep -E '^ +[0-9]' | sed -e 's/[ -]*$//' -n -e '1,60p' || true
} >benches/results/profile-ztf.txt
cat benches/results/profile-ztf.txt >&2

fi
if want latency; then
echo "bench: latency at $LAT_RATE alerts/s for $LAT_SECONDS s" >&2
LAT_N=$((LAT_RATE * LAT_SECONDS))
LAT_COPIES=$(( (LAT_N + 22) / 23 ))
LAT_N=$((LAT_COPIES * 23))
LAT_MB=$(du -cb tests/data/alerts/ztf/*.avro | tail -1 | awk -v c="$LAT_COPIES" '{printf "%.1f", $1 * c / 1e6}')
run_ztfhook "ztfhook pass-through at $LAT_RATE/s" "$MOCK" ztf_20260102_programid1 "$LAT_N" "$LAT_MB" subscribe \
  "loader=$X/load_alerts --bootstrap $MOCK --topic ztf_20260102_programid1 --partitions $PARTITIONS --copies $LAT_COPIES --rate $LAT_RATE tests/data/alerts/ztf"

fi
if want tansu; then
echo "bench: tansu (sqlite), $TANSU_N alerts" >&2
TANSU_COPIES=$(( (TANSU_N + 22) / 23 ))
TANSU_N=$((TANSU_COPIES * 23))
TANSU_MB=$(du -cb tests/data/alerts/ztf/*.avro | tail -1 | awk -v c="$TANSU_COPIES" '{printf "%.1f", $1 * c / 1e6}')
$X/load_alerts --bootstrap "$ZTFHOOK_TEST_BOOTSTRAP" --topic tansu-bench --partitions 4 --copies "$TANSU_COPIES" \
  tests/data/alerts/ztf >&2
run_ztfhook "ztfhook pass-through (tansu)" "$ZTFHOOK_TEST_BOOTSTRAP" tansu-bench "$TANSU_N" "$TANSU_MB" tansu

fi
run_replay() { # RUN TARBALL N MB: ztfhook replay, timed as a whole process
  local run=$1 tarball=$2 n=$3 mb=$4 id ps cfg
  id=$(echo "$run" | tr -c 'a-z0-9\n' '-' | tr -s '-')
  ps=bench-$id
  pubsub_topic "$ps"
  cfg=$WORK/$id.toml
  printf '[kafka]\nbootstrap.servers = "127.0.0.1:9"\ngroup.id = "unused"\ntopics = ["unused"]\n\n[pubsub]\nproject = "%s"\ntopic = "%s"\n\n[pipeline]\nstats_interval_ms = 0\n' \
    "$PROJECT" "$ps" >"$cfg"
  mark
  t=$(timed "$WORK/$id" "$ZTFHOOK_BIN" --config "$cfg" replay --from-start --checkpoint "$WORK/$id.checkpoint" "$tarball")
  read -r wall user sys rss <<<"$t"
  grep -q "1 of 1 inputs complete; $n members read" "$WORK/$id.err" ||
    { echo "bench: $run did not replay $n members" >&2; tail "$WORK/$id.err" >&2; exit 1; }
  record "$run" - "$n" "$mb" "$wall" "$(calc "$user + $sys")" "$rss" 0
}
if want replay; then
REPLAY_N=$((23 * REPLAY_COPIES))
echo "bench: a nightly tarball of $REPLAY_N alerts" >&2
python3 benches/tools/make_tarball.py "$WORK/ztf_public_20250302.tar.gz" "$REPLAY_COPIES" tests/data/alerts/ztf/*.avro
gzip -dc "$WORK/ztf_public_20250302.tar.gz" >"$WORK/ztf_public_20250302.tar"
REPLAY_MB=$(stat -c %s "$WORK/ztf_public_20250302.tar.gz" | awk '{printf "%.1f", $1 / 1e6}')
rep run_replay "ztfhook replay (ztf .tar.gz $REPLAY_MB MB)" "$WORK/ztf_public_20250302.tar.gz" "$REPLAY_N" "$REPLAY_MB"
rep run_replay "ztfhook replay (ztf plain .tar)" "$WORK/ztf_public_20250302.tar" "$REPLAY_N" "$REPLAY_MB"
rm -f "$WORK"/ztf_public_20250302.tar*

fi
mkdir -p benches/results
# A partial run (SECTIONS=...) replaces its own rows in the last results.
if [[ $SECTIONS != "ztf rubin latency tansu replay" && -f benches/results/throughput.csv ]]; then
  awk -F, 'NR == FNR { if (FNR > 1) { row[$1] = $0; order[++n] = $1 } next }
    FNR == 1 { print; next }
    { if ($1 in row) { print row[$1]; done[$1] = 1 } else print }
    END { for (i = 1; i <= n; i++) if (!(order[i] in done)) print row[order[i]] }' \
    "$CSV" benches/results/throughput.csv >"$WORK/merged.csv"
  mv "$WORK/merged.csv" "$CSV"
fi
cp "$CSV" benches/results/throughput.csv
# Every repetition, for medians of other columns than the rate.
cp "$WORK/reps.csv" benches/results/throughput-reps.csv
{
  echo "# ztfhook throughput, $(date -u +%Y-%m-%d)"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(rustc --version). Broker: librdkafka's mock cluster in its own process ($PARTITIONS partitions), or tansu with sqlite; Pub/Sub: Google's emulator, topics without subscriptions except the latency run. CPU is user + sys of the bridge process; broker CPU is the mock's (or tansu's) during the run."
  echo
  echo "| run | broker | alerts | MB | s | alerts/s | MB/s | CPU s / 1000 alerts | peak RSS MB | broker CPU s | emulator CPU s | p50 ms | p99 ms |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  tail -n +2 "$CSV" | awk -F, '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13}'
} >benches/results/throughput.md
cat benches/results/throughput.md
