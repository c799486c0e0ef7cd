-- The operator console: who replayed, purged or retried what, and when. (No index on the
-- runs' status: a run's outcome changes its status, and an index on it would cost every
-- record its in-place update. The console's listings by status walk the time index.)

create table audit_log (
    id bigint generated always as identity primary key,
    at timestamptz not null default now(),
    -- The operator's name (the key of console.operators they logged in with).
    actor text not null check (actor <> ''),
    action text not null check (action in ('replay', 'purge', 'retry')),
    -- What the action applied to: a dead-letter filter, or a run.
    target text not null,
    -- What came of it, once known: counts, or the error. Null while it runs.
    outcome text,
    finished_at timestamptz
);
create index audit_log_at on audit_log (at desc);
