-- A run's outcome is written in place (a HOT update: no index entry) only if its page has
-- room for the new version beside the old one. A batch records the outcomes of runs its
-- claim inserted side by side, in one transaction, so none of the old versions can be
-- pruned before the last new one is written: each page needs room for a second copy of
-- every row on it. At a fillfactor of 80 only about two outcomes in five found it, and each
-- of the others wrote four index entries, later cleaned up by the index's own deletions.
-- A running run's row is at least as large as its finished one (the claim's token, lease and
-- worker become a provider id and a finish time), so pages filled to 45 % leave the room.
-- Outcomes with a long error may still move to another page; they are the few.
create or replace function appevents_create_run_partitions(from_at timestamptz, days_ahead integer)
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
                'with (fillfactor = 45)', partition);
            execute format('alter table runs attach partition %I for values from (%L) to (%L)',
                partition, day_start, day_start + interval '1 day');
            made := made + 1;
        end if;
        day_start := day_start + interval '1 day';
    end loop;
    return made;
end
$$;

-- The partitions already made: rows inserted from now on get the room (a setting change,
-- no rewrite; it takes only a SHARE UPDATE EXCLUSIVE lock, so claims and records go on).
do $$
declare
    partition regclass;
begin
    for partition in select i.inhrelid::regclass from pg_inherits i
                     where i.inhparent = 'runs'::regclass loop
        execute format('alter table %s set (fillfactor = 45)', partition);
    end loop;
end
$$;
