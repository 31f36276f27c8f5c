#!/bin/sh
# Creates the cluster on the first start (an empty volume), then runs the
# command (default: postgres). The password is read from POSTGRES_PASSWORD and
# never written to the log.
set -eu
: "${POSTGRES_USER:=ragd}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: set POSTGRES_PASSWORD (the password of $POSTGRES_USER)" >&2
        exit 1
    fi
    echo "postgres: creating the cluster in $PGDATA (first start)" >&2
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    # Other containers reach it over the compose network, with the password.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    if [ "$POSTGRES_USER" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_USER\";" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
fi
if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -D "$PGDATA" "$@"
fi
exec "$@"
