-- Run history partitioned by day, so expired history is dropped a partition at a time (a
-- catalog change, no rewrite, no long lock), and a compact key table that keeps a run unique
-- per (user, event id, workflow) across partitions. docs/history.md explains the design.

-- The deduplication keys: one row per run, no payload, errors or counters. A claim or a
-- record finds its run's row (id and partition) here; the primary key is what makes a run
-- exactly-once within the retention window, whichever day's partition the run lives in.
-- Fixed-width columns first: no alignment padding.
create table run_keys (
    workflow_id uuid not null,
    run_id uuid not null,
    created_at timestamptz not null,
    event_id text not null,
    user_id text not null,
    primary key (event_id, user_id, workflow_id)
);
-- Keys arrive in time order, so a block-range index finds the expired ones for a few pages.
create index run_keys_created on run_keys using brin (created_at);

-- The upper bound of a partition of runs (null for one open to the future).
create function appevents_run_partition_bounds(partition oid, out lower_bound timestamptz,
    out upper_bound timestamptz)
language sql stable as $$
    select (regexp_match(b, 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
           (regexp_match(b, 'TO \(''([^'']+)''\)'))[1]::timestamptz
    from (select pg_get_expr(c.relpartbound, c.oid) as b from pg_class c where c.oid = partition) p
$$;

-- Creates each missing day (UTC) of runs from `from_at` to `days_ahead` days after today.
-- A partition is created empty and then attached, which takes only a SHARE UPDATE EXCLUSIVE
-- lock on runs: claims and records go on meanwhile. Returns the partitions created.
create function appevents_create_run_partitions(from_at timestamptz, days_ahead integer)
returns integer
language plpgsql as $$
declare
    day_start timestamptz := date_trunc('day', from_at, 'UTC');
    stop_at timestamptz := date_trunc('day', now(), 'UTC') + make_interval(days => days_ahead + 1);
    partition text;
    made integer := 0;
begin
    -- One creator at a time: two would both find a day missing.
    perform pg_advisory_xact_lock(7020896532017350003);
    while day_start < stop_at loop
        if not exists (
            select 1 from pg_inherits i, appevents_run_partition_bounds(i.inhrelid) b
            where i.inhparent = 'runs'::regclass
              and coalesce(b.lower_bound, '-infinity') < day_start + interval '1 day'
              and coalesce(b.upper_bound, 'infinity') > day_start
        ) then
            partition := 'runs_' || to_char(day_start at time zone 'UTC', 'YYYYMMDD');
            execute format(
                'create table %I (like runs including defaults including constraints) '
                -- Room on each page for a run's outcome to be written in place (HOT).
                'with (fillfactor = 80)', partition);
            execute format('alter table runs attach partition %I for values from (%L) to (%L)',
                partition, day_start, day_start + interval '1 day');
            made := made + 1;
        end if;
        day_start := day_start + interval '1 day';
    end loop;
    return made;
end
$$;

-- The history so far becomes the first partition, as it is: only the index the new primary
-- key needs is built, and the keys are copied. Its rows expire together, once the newest of
-- them is older than the retention.
alter table runs rename to runs_legacy;
alter table runs_legacy rename constraint runs_pkey to runs_legacy_pkey;
alter table runs_legacy rename constraint runs_event_id_user_id_workflow_id_key
    to runs_legacy_key;
alter index runs_user_created rename to runs_legacy_user_created;
alter index runs_workflow_created rename to runs_legacy_workflow_created;
alter index runs_created rename to runs_legacy_created;

create table runs (like runs_legacy including defaults including constraints)
    partition by range (created_at);
-- The partition key is part of every unique index of a partitioned table; a run is found
-- by its id alone through this index too (id leads).
alter table runs add primary key (id, created_at);
alter table runs add constraint runs_workflow_id_fkey foreign key (workflow_id)
    references workflows (id) on delete cascade;
create index runs_user_created on runs (user_id, created_at desc);
create index runs_workflow_created on runs (workflow_id, created_at desc);
create index runs_created on runs (created_at desc);

insert into run_keys (workflow_id, run_id, created_at, event_id, user_id)
select workflow_id, id, created_at, event_id, user_id from runs_legacy order by created_at;

do $$
declare
    -- Up to the end of today (UTC): runs created later go to the daily partitions.
    legacy_until timestamptz := date_trunc('day', now(), 'UTC') + interval '1 day';
begin
    if exists (select 1 from runs_legacy) then
        -- The keys above are the uniqueness now, and the primary key becomes (id,
        -- created_at), built by the attach.
        alter table runs_legacy drop constraint runs_legacy_key;
        alter table runs_legacy drop constraint runs_legacy_pkey;
        execute format('alter table runs attach partition runs_legacy '
            'for values from (minvalue) to (%L)', legacy_until);
    else
        drop table runs_legacy;
    end if;
end
$$;

select appevents_create_run_partitions(now(), 7);
