#!/usr/bin/env bash
# Drops the databases and queues that integration tests, the chaos run and the benchmark
# create (appevents_test_*, appevents_chaos_*, appevents_bench_*; queues test.*, chaos.*,
# bench.*) and that an interrupted run left behind. Touches nothing else.
set -euo pipefail

psql_admin=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -d postgres -Atq)
for db in $("${psql_admin[@]}" -c "select datname from pg_database where datname like 'appevents\_test\_%' or datname like 'appevents\_chaos\_%' or datname like 'appevents\_bench\_%'"); do
  "${psql_admin[@]}" -c "drop database if exists \"$db\" with (force)" >/dev/null
done

for queue in $(rabbitmqctl -q list_queues name --no-table-headers 2>/dev/null | grep -E '^(test|chaos|bench)\.[0-9a-f]+\.' || true); do
  rabbitmqctl -q delete_queue "$queue" >/dev/null || true
done
