-- The operator console: who replayed, purged or retried what, and when; and the index that
-- keeps its run listings fast when filtered by status over a large history.

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

-- "Dead runs, newest first" and the overview's counts by status read this instead of
-- walking the whole history by time.
create index runs_status_created on runs (status, created_at desc);
