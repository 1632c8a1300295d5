#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for tests (ferry-backend's own tests start
# them through ferry_backend::testing::PgServer, which runs this script).
#
#   pg-test-server.sh install            apt-get install postgresql (if missing)
#   pg-test-server.sh start DIR [PORT]   initdb DIR (first time) and start it;
#                                        prints the superuser URL
#   pg-test-server.sh createdb DIR NAME  creates database NAME, prints its URL
#   pg-test-server.sh psql DIR DB SQL    runs SQL in database DB, prints rows
#   pg-test-server.sh stop DIR           fast shutdown (data kept; `start` again)
#   pg-test-server.sh remove DIR         stop and delete DIR
#   pg-test-server.sh watch PID DIR      remove DIR once process PID has exited
#
# The cluster listens on 127.0.0.1:PORT (a free port if not given) and on a
# unix socket in DIR, with password (scram) auth over TCP for user `ferry`;
# the password is random, kept in DIR/password. Running as root, the server
# runs as the `postgres` user (initdb refuses root). Every step is idempotent.
#
# FERRY_PG_NO_INSTALL=1 makes `start` fail instead of installing (tests set
# it: they must not change the machine). FERRY_PG_BINDIR overrides the
# binaries' directory.
set -euo pipefail

die() { echo "pg-test-server: $*" >&2; exit 1; }

find_bindir() {
    if [[ -n "${FERRY_PG_BINDIR:-}" ]]; then
        [[ -x "$FERRY_PG_BINDIR/initdb" ]] || return 1
        echo "$FERRY_PG_BINDIR"; return
    fi
    # Debian keeps the server binaries out of PATH; take the newest version.
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"; return
    fi
    return 1
}

install() {
    find_bindir >/dev/null && return 0
    [[ "${FERRY_PG_NO_INSTALL:-}" == 1 ]] &&
        die "PostgreSQL server binaries not found. Install them with: scripts/pg-test-server.sh install (runs apt-get install -y postgresql)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    find_bindir >/dev/null || die "postgresql installed but initdb not found"
}

# Runs a command as the cluster owner.
as_owner() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A port below the kernel's ephemeral range: the tests' many outgoing
# connections take ephemeral ports, and one of those on the chosen number
# makes the server's bind fail even though nothing listens there.
free_port() {
    local p low
    low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    ((low > 12000)) || low=32768
    for _ in $(seq 200); do
        p=$((10000 + RANDOM % (low - 10000)))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
    die "no free port found"
}

url() { echo "postgres://ferry:$(cat "$1/password")@127.0.0.1:$(cat "$1/port")/${2:-postgres}"; }

start() {
    local dir=$1 port=${2:-}
    install
    local bin; bin=$(find_bindir)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        [[ -f "$dir/password" ]] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/password"
        [[ $(id -u) == 0 ]] && chown -R postgres: "$dir"
        chmod 700 "$dir"
        as_owner "$bin/initdb" -D "$dir/data" -U ferry --pwfile="$dir/password" \
            --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
            die "initdb failed: $(cat "$dir/initdb.log")"
    fi
    # A port we chose may still turn out taken (bind races the probe):
    # choose again. A given or recorded port is retried after a pause.
    local chosen=0 attempt
    if [[ -z "$port" && ! -f "$dir/port" ]]; then chosen=1; fi
    [[ -n "$port" ]] || port=$(cat "$dir/port" 2>/dev/null || free_port)
    for attempt in 1 2 3 4 5; do
        echo "$port" >"$dir/port"
        as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 && break
        # fsync off: a test cluster is thrown away, speed matters more.
        : >"$dir/server.log"; [[ $(id -u) == 0 ]] && chown postgres: "$dir/server.log"
        as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start >/dev/null && break
        grep -q "Address already in use" "$dir/server.log" && ((attempt < 5)) ||
            die "pg_ctl start failed: $(tail -n 20 "$dir/server.log")"
        if ((chosen)); then port=$(free_port); else sleep 1; fi
    done
    url "$dir"
}

createdb() {
    local dir=$1 name=$2 bin; bin=$(find_bindir)
    PGOPTIONS="-c client_min_messages=warning" as_owner "$bin/psql" -h "$dir" -p "$(cat "$dir/port")" -U ferry -d postgres -qAt -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS \"$name\"" -c "CREATE DATABASE \"$name\"" >/dev/null
    url "$dir" "$name"
}

psql() {
    local dir=$1 db=$2 sql=$3 bin; bin=$(find_bindir)
    as_owner "$bin/psql" -h "$dir" -p "$(cat "$dir/port")" -U ferry -d "$db" -qAt -v ON_ERROR_STOP=1 -c "$sql"
}

stop() {
    local dir=$1 bin; bin=$(find_bindir) || return 0
    [[ -f "$dir/data/PG_VERSION" ]] || return 0
    as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 || return 0
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null
}

remove() {
    [[ -d "$1" ]] || return 0
    stop "$1" || as_owner "$(find_bindir)/pg_ctl" -D "$1/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$1"
}

watch() {
    local pid=$1 dir=$2
    # A Ctrl-C reaches the whole foreground group: the watchdog must outlive
    # it to remove the cluster once the test process is gone.
    trap '' INT HUP TERM
    while kill -0 "$pid" 2>/dev/null; do sleep 1; done
    remove "$dir"
}

cmd=${1:-}; shift || true
case "$cmd" in
    install) install ;;
    start) [[ $# -ge 1 ]] || die "usage: start DIR [PORT]"; start "$@" ;;
    createdb) [[ $# -eq 2 ]] || die "usage: createdb DIR NAME"; createdb "$@" ;;
    psql) [[ $# -eq 3 ]] || die "usage: psql DIR DB SQL"; psql "$@" ;;
    stop) [[ $# -eq 1 ]] || die "usage: stop DIR"; stop "$1" ;;
    remove) [[ $# -eq 1 ]] || die "usage: remove DIR"; remove "$1" ;;
    watch) [[ $# -eq 2 ]] || die "usage: watch PID DIR"; watch "$@" ;;
    *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
