-- App events: a named event type with an example payload (its "schema"), which is the test
-- data for every workflow it triggers.
create table app_events (
    id uuid primary key,
    name text not null unique check (name <> '' and length(name) <= 255),
    schema jsonb not null check (jsonb_typeof(schema) = 'object'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- One user's credentials for one provider account. Secret columns hold ciphertext
-- (see src/vault.rs); `unique (id, user_id)` lets subscriptions reference both, so the
-- database itself refuses a subscription bound to another user's connection.
create table connections (
    id uuid primary key,
    user_id text not null check (user_id <> ''),
    provider text not null check (provider in ('salesforce', 'hubspot', 'http')),
    base_url text not null,
    settings jsonb not null default '{}' check (jsonb_typeof(settings) = 'object'),
    access_token bytea,
    refresh_token bytea,
    token_url text,
    client_id text,
    client_secret bytea,
    status text not null default 'active' check (status in ('active', 'needs_reauth')),
    status_reason text,
    token_refreshed_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (id, user_id)
);
create index connections_user on connections (user_id);

-- A workflow: triggered by one app event, one integration step with its field mapping.
create table workflows (
    id uuid primary key,
    name text not null check (name <> ''),
    app_event_id uuid not null references app_events (id) on delete restrict,
    provider text not null check (provider in ('salesforce', 'hubspot', 'http')),
    action text not null,
    options jsonb not null default '{}' check (jsonb_typeof(options) = 'object'),
    mapping jsonb not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index workflows_app_event on workflows (app_event_id);

-- A user has switched a workflow on, bound to one of that same user's connections.
create table subscriptions (
    id uuid primary key,
    user_id text not null check (user_id <> ''),
    workflow_id uuid not null references workflows (id) on delete cascade,
    connection_id uuid not null,
    created_at timestamptz not null default now(),
    unique (user_id, workflow_id),
    foreign key (connection_id, user_id) references connections (id, user_id) on delete cascade
);
create index subscriptions_connection on subscriptions (connection_id);

-- One workflow executed for one event. Unique per (user, event id, workflow): the claim that
-- makes redelivery and duplicate publishes run a workflow once. The event id is scoped to
-- its user so one tenant's ids can never collide with another's.
create table runs (
    id uuid primary key,
    event_id text not null,
    workflow_id uuid not null references workflows (id) on delete cascade,
    user_id text not null,
    event_name text not null,
    connection_id uuid,
    status text not null check (status in ('running', 'succeeded', 'retrying', 'dead')),
    -- Provider calls made, over every delivery of the event.
    attempts integer not null default 0,
    -- Times a worker took the run.
    claims integer not null default 0,
    -- Times the run was taken over because its worker vanished mid-run (crash, kill, lost
    -- lease); bounds runs that keep crashing their worker.
    abandoned integer not null default 0,
    claim_token uuid,
    claimed_until timestamptz,
    provider_id text,
    last_error jsonb,
    next_attempt_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    finished_at timestamptz,
    -- Event id first: the same index answers "the runs of this event".
    unique (event_id, user_id, workflow_id)
)
-- Room on each page for the outcome to be written in place (a HOT update, no index writes):
-- no index covers the columns a run's outcome changes.
with (fillfactor = 80);
create index runs_user_created on runs (user_id, created_at desc);
create index runs_workflow_created on runs (workflow_id, created_at desc);
create index runs_created on runs (created_at desc);

-- Workers cache resolved subscriptions; any change to what the cache holds notifies them.
create function appevents_notify_config_change() returns trigger
language plpgsql as $$
begin
    perform pg_notify('appevents_config', tg_table_name);
    return null;
end
$$;

create trigger app_events_changed after insert or update or delete or truncate on app_events
    for each statement execute function appevents_notify_config_change();
create trigger connections_changed after insert or update or delete or truncate on connections
    for each statement execute function appevents_notify_config_change();
create trigger workflows_changed after insert or update or delete or truncate on workflows
    for each statement execute function appevents_notify_config_change();
create trigger subscriptions_changed after insert or update or delete or truncate on subscriptions
    for each statement execute function appevents_notify_config_change();
