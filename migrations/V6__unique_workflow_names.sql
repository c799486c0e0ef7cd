-- A workflow's name is unique, ignoring case: running a `workflow create` line twice no longer
-- makes a second workflow of the same name, and a name finds one workflow. Duplicates made
-- before this are kept, the newer ones renamed with the start of their id.
with ranked as (
    select id, row_number() over (partition by lower(name) order by created_at, id) as n
    from workflows
)
update workflows w
set name = w.name || ' (' || left(w.id::text, 8) || ')'
from ranked r
where w.id = r.id and r.n > 1;

create unique index workflows_name_unique on workflows (lower(name));
