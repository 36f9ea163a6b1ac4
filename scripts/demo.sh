#!/usr/bin/env bash
# The demo, in one command on a fresh Debian machine: installs what is missing,
# builds ztfhook, starts a local Kafka-compatible broker (tansu) and Google's
# Pub/Sub emulator, loads the sample ZTF and Rubin alerts into tonight's ZTF
# topic, runs `ztfhook --config config/local.toml`, and shows what arrived in
# Pub/Sub. Everything it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "demo: building ztfhook (release; the first build takes a few minutes)" >&2
build_log=$(mktemp "${TMPDIR:-/tmp}/ztfhook-build.XXXXXX")
cargo build --release --locked --bin ztfhook --example load_alerts >"$build_log" 2>&1 ||
  { cat "$build_log" >&2; exit 1; }
rm -f "$build_log"

services=$(mktemp -d "${TMPDIR:-/tmp}/ztfhook-demo.XXXXXX")
bridge=""
cleanup() {
  if [[ -n $bridge ]] && kill -0 "$bridge" 2>/dev/null; then kill -TERM "$bridge"; wait "$bridge" || true; fi
  scripts/services.sh stop "$services"
}
trap cleanup EXIT
scripts/services.sh start "$services"
# shellcheck disable=SC1091
source "$services/env"

# What config/local.toml reads from the environment.
export ZTFHOOK_BOOTSTRAP=$ZTFHOOK_TEST_BOOTSTRAP
export ZTFHOOK_TOPIC=ztf_$(date -u +%Y%m%d)_programid1
export ZTFHOOK_PROJECT=ztfhook-local ZTFHOOK_PUBSUB_TOPIC=ztf-alerts
export ZTFHOOK_DEAD_LETTER_TOPIC=ztf-alerts-deadletter
emulator=http://$PUBSUB_EMULATOR_HOST/v1/projects/$ZTFHOOK_PROJECT
for topic in "$ZTFHOOK_PUBSUB_TOPIC" "$ZTFHOOK_DEAD_LETTER_TOPIC"; do
  curl -sf -X PUT "$emulator/topics/$topic" >/dev/null
done
curl -sf -X PUT "$emulator/subscriptions/$ZTFHOOK_PUBSUB_TOPIC-demo" -H 'content-type: application/json' \
  -d "{\"topic\": \"projects/$ZTFHOOK_PROJECT/topics/$ZTFHOOK_PUBSUB_TOPIC\"}" >/dev/null

target/release/examples/load_alerts --bootstrap "$ZTFHOOK_BOOTSTRAP" --topic "$ZTFHOOK_TOPIC" \
  --partitions 4 tests/data/alerts/ztf tests/data/alerts/rubin
expected=$(find tests/data/alerts/ztf tests/data/alerts/rubin -name '*.avro' | wc -l)

echo "demo: ztfhook --config config/local.toml (log: $services/ztfhook.log)" >&2
target/release/ztfhook --config config/local.toml 2>"$services/ztfhook.log" &
bridge=$!

# Pull (and acknowledge) from the subscription until every alert arrived.
python3 - "$emulator/subscriptions/$ZTFHOOK_PUBSUB_TOPIC-demo" "$expected" <<'EOF'
import base64, hashlib, json, sys, time, urllib.request

url, expected = sys.argv[1], int(sys.argv[2])

def call(verb, body):
    req = urllib.request.Request(f"{url}:{verb}", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)

rows, deadline = [], time.time() + 180
while len(rows) < expected and time.time() < deadline:
    got = call("pull", {"maxMessages": 100}).get("receivedMessages", [])
    if not got:
        time.sleep(0.5)
        continue
    call("acknowledge", {"ackIds": [m["ackId"] for m in got]})
    for m in got:
        data = base64.b64decode(m["message"].get("data", ""))
        a = m["message"].get("attributes", {})
        form = "ZTF Avro container" if data[:4] == b"Obj\x01" else "Rubin Confluent wire" if data[:1] == b"\0" else "?"
        rows.append((int(a["kafka.partition"]), int(a["kafka.offset"]), len(data), hashlib.sha256(data).hexdigest()[:16], form))
rows.sort()
print(f"\n{'partition':>9} {'offset':>6} {'bytes':>7}  {'sha256':16}  payload")
for r in rows:
    print(f"{r[0]:>9} {r[1]:>6} {r[2]:>7}  {r[3]}  {r[4]}")
print(f"\n{len(rows)} of {expected} alerts arrived in Pub/Sub, bytes untouched, with kafka.* attributes")
sys.exit(0 if len(rows) == expected else 1)
EOF

kill -TERM "$bridge"
wait "$bridge"
bridge=""
echo "demo: ztfhook stopped; its last lines:" >&2
tail -n 4 "$services/ztfhook.log" >&2
