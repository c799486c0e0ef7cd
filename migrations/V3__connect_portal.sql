-- The Connect Portal: browser sessions of the pages, and OAuth authorizations in flight.

-- A browser session of a page group ('portal'; the operator console may add its own kind).
-- The cookie holds a random token; only its SHA-256 is kept, so a database read gives no
-- session away. The CSRF token goes into every form of the session's pages.
create table web_sessions (
    digest bytea primary key,
    kind text not null check (kind <> ''),
    subject text not null check (subject <> ''),
    csrf_token text not null,
    -- SHA-256 of the user token that opened the session: a user token opens one session only,
    -- so one that leaks after use (a log, a browser's history) opens nothing.
    opened_by bytea unique,
    expires_at timestamptz not null,
    created_at timestamptz not null default now()
);
create index web_sessions_expires on web_sessions (expires_at);

-- An OAuth authorization in flight: Connect was pressed, the provider has not redirected
-- back yet. The callback consumes the row (delete … returning), so a state works once; the
-- row binds it to the browser session that started it. The PKCE verifier never leaves the
-- server, and is sealed by the vault like every other secret.
create table oauth_authorizations (
    nonce text primary key,
    user_id text not null check (user_id <> ''),
    provider text not null check (provider in ('salesforce', 'hubspot')),
    session_digest bytea not null,
    verifier bytea,
    expires_at timestamptz not null,
    created_at timestamptz not null default now()
);
create index oauth_authorizations_expires on oauth_authorizations (expires_at);
