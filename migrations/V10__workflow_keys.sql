-- Workflows as files: a file names its workflow by a stable key, so applying the same file
-- again finds the workflow it made (and a renamed workflow is still the same one). Workflows
-- made by `workflow create` have none until a file takes them over.
alter table workflows
    add column key text check (key is null or key ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$');

create unique index workflows_key_unique on workflows (key);
