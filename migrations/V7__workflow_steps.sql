-- Workflows of several steps, with conditions. A one-step workflow stays as it was (action,
-- options and mapping; no steps): existing workflows run unchanged. A workflow with more
-- keeps its whole definition in `steps` (its first step stays in the columns too).
alter table workflows
    add column steps jsonb check (steps is null or jsonb_typeof(steps) = 'array'),
    add column condition text check (condition is null or condition <> '');

-- The outcome of each step of a run of a workflow with `steps`, written as each step ends,
-- so a retry, a takeover or a replay resumes at the step that failed, with the outputs of
-- those before it, and never repeats a step that succeeded. A one-step workflow's run row
-- is its whole record: it writes nothing here.
create table run_steps (
    run_id uuid not null,
    -- The run's partition key: rows are deleted with the run's partition.
    run_created_at timestamptz not null,
    step text not null,
    -- The element of a for_each, -1 for a step without one.
    item integer not null,
    status text not null check (status in ('succeeded', 'failed', 'skipped')),
    -- Provider calls made for the step, over every attempt of the run.
    attempts integer not null default 0,
    started_at timestamptz not null,
    finished_at timestamptz not null,
    -- What was sent: method and URL, never a header (they carry the credentials).
    request jsonb,
    output jsonb,
    error jsonb,
    primary key (run_id, step, item)
);
create index run_steps_created on run_steps using brin (run_created_at);
