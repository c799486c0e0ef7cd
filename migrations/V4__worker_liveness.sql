-- A claim lasts as long as its worker is alive. Each worker process renews its own row here
-- every few seconds: one statement per worker, however many runs it holds. A run whose
-- worker stopped renewing is free to take over once `alive_until` has passed.
create table workers (
    id uuid primary key,
    alive_until timestamptz not null,
    started_at timestamptz not null default now()
);

-- The worker holding a running run. No foreign key: a worker's row is removed long after it
-- died, and a run whose worker row is gone falls back to its own `claimed_until`.
alter table runs add column claimed_by uuid;
