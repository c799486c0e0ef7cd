#!/usr/bin/env bash
# Drops the databases and queues that integration tests create (appevents_test_*, test.*)
# and that a test interrupted before its cleanup left behind. Touches nothing else.
set -euo pipefail

psql_admin=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -d postgres -Atq)
for db in $("${psql_admin[@]}" -c "select datname from pg_database where datname like 'appevents\_test\_%'"); do
  "${psql_admin[@]}" -c "drop database if exists \"$db\" with (force)" >/dev/null
done

for queue in $(rabbitmqctl -q list_queues name --no-table-headers 2>/dev/null | grep -E '^test\.[0-9a-f]+\.' || true); do
  rabbitmqctl -q delete_queue "$queue" >/dev/null || true
done
