-- Every name an app event answers to: its current name and its aliases (names it had before
-- a rename). Producers keep publishing under an old name after a rename; the alias keeps
-- those events running the app event's workflows until an operator removes it. A name
-- belongs to one app event only (the primary key), whether current or alias.
create table app_event_names (
    name text primary key check (name <> '' and length(name) <= 255),
    app_event_id uuid not null references app_events (id) on delete cascade,
    -- The target of app_events' own foreign key below.
    unique (name, app_event_id)
);
create index app_event_names_app_event on app_event_names (app_event_id);

insert into app_event_names (name, app_event_id) select name, id from app_events;

-- A new or changed current name is added to the app event's names; the name it replaces
-- stays, as an alias. Done here rather than in each writer so no writer can forget it.
create function appevents_add_app_event_name() returns trigger
language plpgsql as $$
begin
    insert into app_event_names (name, app_event_id) values (new.name, new.id)
        on conflict (name) do nothing;
    if not found then
        -- Already listed: fine if it is this app event's own alias, taken back.
        perform 1 from app_event_names where name = new.name and app_event_id = new.id;
        if not found then
            raise exception using
                errcode = 'unique_violation',
                message = format('app event name %L is taken', new.name),
                detail = format('%L is a name or alias of another app event', new.name);
        end if;
    end if;
    return null;
end
$$;

create trigger app_events_add_name after insert or update of name on app_events
    for each row execute function appevents_add_app_event_name();

-- The current name is always one of the app event's names: removing it as if it were an
-- alias fails. Deferred, because the trigger above adds the row after the app event's.
alter table app_events add constraint app_events_name_listed
    foreign key (name, id) references app_event_names (name, app_event_id)
    deferrable initially deferred;

-- Payload checking against the example payload: off, warn (log and count), reject
-- (dead-letter the event).
alter table app_events add column payload_check text not null default 'off'
    check (payload_check in ('off', 'warn', 'reject'));

-- The workers' cache holds names too.
create trigger app_event_names_changed after insert or update or delete or truncate on app_event_names
    for each statement execute function appevents_notify_config_change();
