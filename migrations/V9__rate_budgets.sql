-- Per-account rate limits shared by the fleet (docs/rate-limits.md).

-- A connection's own limit, overriding its provider's default and what its headers taught.
alter table connections
    add column rate_limit_calls integer check (rate_limit_calls > 0),
    add column rate_limit_interval_ms integer check (rate_limit_interval_ms > 0),
    add constraint connections_rate_limit_whole
        check ((rate_limit_calls is null) = (rate_limit_interval_ms is null));

-- One token bucket per connection, from which workers lease budget a few calls at a time;
-- and what the provider last said about the account's limit and usage.
create table rate_budgets (
    connection_id uuid primary key references connections (id) on delete cascade,
    -- Tokens left when last leased from; null until first leased (a full bucket).
    tokens double precision,
    refilled_at timestamptz not null default clock_timestamp(),
    -- The limit the provider reports (HubSpot's X-HubSpot-RateLimit-Max and -Interval-Milliseconds).
    learned_calls integer check (learned_calls > 0),
    learned_interval_ms integer check (learned_interval_ms > 0),
    -- HubSpot's X-HubSpot-RateLimit-Remaining, as last seen.
    remaining integer,
    -- Salesforce's Sforce-Limit-Info api-usage=used/max, as last seen.
    api_used bigint,
    api_max bigint,
    observed_at timestamptz
);

-- Leases up to p_want calls of a connection's budget, after charging p_debt calls made
-- beyond earlier leases (a step's follow-up requests). The limit is the connection's own,
-- else the one learned from the provider, else p_default_calls per p_default_interval_ms;
-- none at all grants everything asked. The bucket refills at 90 % of the limit's rate and
-- holds 3 % of it (at least one call): calls stay under the limit in any window of its
-- interval, whichever way the provider's own window falls, with room for leases spent a
-- little late.
create function lease_rate_budget(
    p_connection uuid, p_default_calls integer, p_default_interval_ms integer,
    p_want integer, p_debt integer
) returns table (granted integer, limit_calls integer, limit_interval_ms integer,
                 wait_ms integer)
language plpgsql as $$
declare
    v_calls integer;
    v_interval integer;
    v_tokens double precision;
    v_refilled timestamptz;
    v_rate double precision;
    v_capacity double precision;
    v_available double precision;
    v_granted integer;
    v_now timestamptz := clock_timestamp();
begin
    select c.rate_limit_calls, c.rate_limit_interval_ms into v_calls, v_interval
    from connections c where c.id = p_connection;
    if not found then
        return query select 0, null::integer, null::integer, null::integer;
        return;
    end if;
    insert into rate_budgets (connection_id) values (p_connection)
    on conflict (connection_id) do nothing;
    select b.tokens, b.refilled_at,
           coalesce(v_calls, b.learned_calls, p_default_calls),
           coalesce(v_interval, b.learned_interval_ms, p_default_interval_ms)
    into v_tokens, v_refilled, v_calls, v_interval
    from rate_budgets b where b.connection_id = p_connection for update;
    if v_calls is null or v_interval is null then
        return query select p_want, null::integer, null::integer, 0;
        return;
    end if;
    v_rate := v_calls * 0.90 / (v_interval / 1000.0);
    v_capacity := greatest(1.0, ceil(v_calls * 0.03));
    v_available := case when v_tokens is null then v_capacity
        else least(v_capacity,
                   v_tokens + v_rate * greatest(0, extract(epoch from v_now - v_refilled)))
        end - greatest(p_debt, 0);
    v_granted := greatest(0, least(p_want, floor(v_available)))::integer;
    update rate_budgets
    set tokens = v_available - v_granted, refilled_at = v_now
    where connection_id = p_connection;
    return query select v_granted, v_calls, v_interval,
        case when v_granted > 0 then 0
             else ceil((1.0 - (v_available - v_granted)) / v_rate * 1000.0)::integer end;
end;
$$;

-- The provider said the account has nothing left (HubSpot's X-HubSpot-RateLimit-Remaining:
-- 0, another app may share it): the fleet's bucket is emptied, to refill at its rate.
create function drain_rate_budget(p_connection uuid) returns void
language sql as $$
    update rate_budgets set tokens = least(coalesce(tokens, 0), 0), refilled_at = clock_timestamp()
    where connection_id = p_connection;
$$;
