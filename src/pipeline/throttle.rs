//! Per-account rate limits, enforced across the fleet, and fairness between accounts within
//! a worker. Called around each run's provider step ([`Throttle::admit`] before the claim,
//! [`Throttle::finish`] after the step), it changes nothing else of the step.
//!
//! - **Budget.** Each connection's budget is a token bucket in Postgres
//!   (`lease_rate_budget`, migration V9). A worker leases a few calls at a time and spends
//!   them from memory, so no database round trip sits on the path of each call; a connection
//!   without any limit is looked up once per `rate_limits.refresh`.
//! - **Waiting.** A run whose account has no budget waits in process up to
//!   `rate_limits.max_wait`, then is deferred through the broker's held queue, which uses
//!   none of its retries.
//! - **Fairness.** At most `rate_limits.in_flight_per_connection` runs of one connection are
//!   in flight in a worker; past it, a run of a throttled account is deferred at once, so
//!   the account's backlog does not hold the worker's slots while other accounts wait.
//! - **Learning.** HubSpot's limit headers replace the configured default for the account
//!   (fleet-wide, through its row); Salesforce's daily usage slows the org's calls above
//!   `rate_limits.salesforce_slow_down` and defers them above `rate_limits.salesforce_defer`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::RateLimitSettings;
use crate::config::rate_limit::RateLimit;
use crate::core::provider::Provider;
use crate::integrations::limits::{ApiUsage, HubspotLimit, Observer};
use crate::observe::metrics::{Metrics, label, labels2};
use crate::pipeline::resolve::Target;

/// Whether a run may call its provider now.
pub enum Admission {
    /// Go ahead; keep the ticket until the step is done.
    Go(Ticket),
    /// Come back through the held queue after `delay`.
    Defer { delay: Duration },
}

/// A run's place among its connection's calls: one call of budget and an in-flight slot,
/// or neither for a run that rides in a batch whose call takes them.
pub struct Ticket {
    account: Option<Arc<Account>>,
    _slot: Option<OwnedSemaphorePermit>,
    /// Calls of budget taken for the run.
    paid: u32,
}

impl Account {
    /// Turns the throttled flag on or off, waking the runs that watch it only when it
    /// changes: it is set on every call, and hundreds of runs may be waiting for a slot.
    fn set_throttled(&self, on: bool) {
        self.throttled.send_if_modified(|throttled| {
            let changed = *throttled != on;
            *throttled = on;
            changed
        });
    }
}

impl Ticket {
    /// Whether the ticket took a call of the account's budget.
    pub fn paid(&self) -> bool {
        self.paid > 0
    }
}

/// What a worker knows of one connection's limits.
struct Account {
    id: Uuid,
    provider: Provider,
    in_flight: Arc<Semaphore>,
    budget: tokio::sync::Mutex<Budget>,
    /// Requests made beyond the one each ticket paid for, charged at the next lease.
    debt: AtomicU32,
    /// A run is waiting for budget, or the last lease found none. Runs waiting for an
    /// in-flight slot watch it, and give up their wait when it turns on.
    throttled: watch::Sender<bool>,
    /// Calls asked for per lease: 2 % of the limit last leased under.
    lease_size: AtomicU32,
    salesforce: Mutex<Salesforce>,
    hubspot: Mutex<Option<HubspotLimit>>,
    /// When this worker last wrote what the provider said to the connection's row.
    noted_at: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Budget {
    /// Calls leased and not spent.
    tokens: u32,
    /// Leased calls are spent before this, or lost: a lease never outlives the window that
    /// makes the fleet's calls stay under the limit.
    expires: Option<Instant>,
    /// The connection had no limit when last looked up: trusted until then.
    unlimited_until: Option<Instant>,
}

#[derive(Default)]
struct Salesforce {
    usage: Option<(ApiUsage, Instant)>,
    /// The next call may go at this instant, while the org is above the slow-down share.
    next_call: Option<Instant>,
    warned: bool,
}

pub struct Throttle {
    pool: Pool,
    settings: RateLimitSettings,
    defaults: HashMap<Provider, Option<RateLimit>>,
    accounts: Mutex<HashMap<Uuid, Arc<Account>>>,
    metrics: Arc<Metrics>,
}

impl Throttle {
    /// Refuses a bad default limit, naming its key.
    pub fn new(
        pool: Pool,
        settings: &RateLimitSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Throttle, String> {
        let mut defaults = HashMap::new();
        for provider in [Provider::Hubspot, Provider::Salesforce, Provider::Http] {
            defaults.insert(provider, settings.default_for(provider.as_str())?);
        }
        Ok(Throttle {
            pool,
            settings: settings.clone(),
            defaults,
            accounts: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn account(&self, id: Uuid, provider: Provider) -> Arc<Account> {
        lock(&self.accounts)
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Account {
                    id,
                    provider,
                    in_flight: Arc::new(Semaphore::new(self.settings.in_flight_per_connection)),
                    budget: tokio::sync::Mutex::new(Budget::default()),
                    debt: AtomicU32::new(0),
                    throttled: watch::Sender::new(false),
                    lease_size: AtomicU32::new(1),
                    salesforce: Mutex::new(Salesforce::default()),
                    hubspot: Mutex::new(None),
                    noted_at: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Decides whether the target's run may call its provider now, waiting at most
    /// `rate_limits.max_wait`. A run that `rides` in a batch takes neither budget nor slot
    /// while its account has budget: its batch's call takes them ([`Throttle::take_call`]).
    /// While the account is throttled it is admitted as any run, so its backlog cannot hold
    /// the worker's slots.
    pub async fn admit(&self, target: &Target, rides: bool) -> Admission {
        let Ok(connection) = &target.connection else {
            // The step fails without calling anyone.
            return Admission::Go(Ticket {
                account: None,
                _slot: None,
                paid: 0,
            });
        };
        let account = self.account(connection.id, target.provider);
        let started = Instant::now();
        let deadline = started + self.settings.max_wait;
        if let Some(delay) = self.salesforce_deferral(&account) {
            return self.defer(&account, delay, "salesforce_daily");
        }
        if rides && !*account.throttled.borrow() {
            return Admission::Go(Ticket {
                account: Some(account),
                _slot: None,
                paid: 0,
            });
        }
        let slot = match account.in_flight.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // The account's calls wait for budget anyway: its other runs give their slots
            // to other accounts and come back later.
            Err(_) => {
                let mut throttled = account.throttled.subscribe();
                let wait = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        slot = account.in_flight.clone().acquire_owned() => slot.ok(),
                        _ = throttled.wait_for(|on| *on) => None,
                    }
                });
                match wait.await {
                    Ok(Some(slot)) => slot,
                    _ => return self.defer(&account, self.settings.max_wait, "in_flight"),
                }
            }
        };
        if let Err(delay) = self.take_budget(&account, deadline).await {
            return self.defer(&account, delay, "budget");
        }
        if let Err(delay) = self.salesforce_pace(&account, deadline).await {
            return self.defer(&account, delay, "salesforce_daily");
        }
        let waited = started.elapsed();
        if !waited.is_zero() {
            self.metrics
                .throttle_waits
                .get_or_create(&label("provider", account.provider.as_str()))
                .observe(waited.as_secs_f64());
        }
        Admission::Go(Ticket {
            account: Some(account),
            _slot: Some(slot),
            paid: 1,
        })
    }

    /// Takes one call of the connection's budget for a batch's call, waiting at most
    /// `rate_limits.max_wait` (and spacing a Salesforce org's calls above its slow-down
    /// share). The call is noted in the observer of the step under way, whose run's ticket
    /// settles it. `Err` is how long until there may be budget.
    pub async fn take_call(&self, connection_id: Uuid, provider: Provider) -> Result<(), Duration> {
        let account = self.account(connection_id, provider);
        let started = Instant::now();
        let deadline = started + self.settings.max_wait;
        let refused = |delay: Duration, reason| {
            self.count_throttled(&account, delay, reason);
            Err(delay)
        };
        if let Some(delay) = self.salesforce_deferral(&account) {
            return refused(delay, "salesforce_daily");
        }
        if let Err(delay) = self.take_budget(&account, deadline).await {
            return refused(delay, "budget");
        }
        if let Err(delay) = self.salesforce_pace(&account, deadline).await {
            return refused(delay, "salesforce_daily");
        }
        crate::integrations::limits::prepaid_call();
        let waited = started.elapsed();
        if !waited.is_zero() {
            self.metrics
                .throttle_waits
                .get_or_create(&label("provider", provider.as_str()))
                .observe(waited.as_secs_f64());
        }
        Ok(())
    }

    fn defer(&self, account: &Account, delay: Duration, reason: &'static str) -> Admission {
        self.count_throttled(account, delay, reason);
        Admission::Defer { delay }
    }

    fn count_throttled(&self, account: &Account, delay: Duration, reason: &'static str) {
        tracing::info!(connection_id = %account.id, wait = ?delay, reason, "account throttled; run deferred without using a retry");
        self.metrics
            .throttled
            .get_or_create(&labels2(
                "provider",
                account.provider.as_str(),
                "reason",
                reason,
            ))
            .inc();
    }

    /// Takes one call of the account's budget, leasing more from Postgres when this
    /// worker's lease is spent. `Err` is how long until there may be budget, when that is
    /// past `deadline`.
    async fn take_budget(&self, account: &Account, deadline: Instant) -> Result<(), Duration> {
        let Ok(mut budget) = tokio::time::timeout_at(deadline, account.budget.lock()).await else {
            return Err(self.settings.max_wait);
        };
        loop {
            let now = Instant::now();
            if budget.unlimited_until.is_some_and(|until| now < until) {
                return Ok(());
            }
            if budget.tokens > 0 && budget.expires.is_some_and(|at| now < at) {
                budget.tokens -= 1;
                account.set_throttled(false);
                return Ok(());
            }
            let lease = match self.lease(account).await {
                Ok(lease) => lease,
                Err(e) => {
                    // The database is down: the claim that follows fails and waits as well;
                    // calling without a lease for a moment is the lesser harm.
                    tracing::warn!(error = %e, "could not lease rate budget; calling without one");
                    return Ok(());
                }
            };
            let now = Instant::now();
            match lease {
                Lease::Unlimited => {
                    budget.unlimited_until = Some(now + self.settings.refresh);
                    return Ok(());
                }
                Lease::Granted { calls, ttl } => {
                    budget.unlimited_until = None;
                    budget.tokens = calls - 1;
                    budget.expires = Some(now + ttl);
                    account.set_throttled(false);
                    return Ok(());
                }
                Lease::Empty { wait } => {
                    account.set_throttled(true);
                    if now + wait > deadline {
                        return Err(wait);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn lease(&self, account: &Account) -> Result<Lease, String> {
        let default = self.defaults.get(&account.provider).copied().flatten();
        let want = account.lease_size.load(Ordering::Relaxed).max(1);
        let debt = account.debt.swap(0, Ordering::Relaxed);
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let statement = client
            .prepare_cached("select * from lease_rate_budget($1, $2, $3, $4, $5)")
            .await
            .map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                &statement,
                &[
                    &account.id,
                    &default.map(|l| i32::try_from(l.calls).unwrap_or(i32::MAX)),
                    &default.map(|l| l.interval_ms()),
                    &i32::try_from(want).unwrap_or(1),
                    &i32::try_from(debt).unwrap_or(i32::MAX),
                ],
            )
            .await
            .map_err(|e| e.to_string())?;
        let granted: i32 = row.try_get(0).map_err(|e| e.to_string())?;
        let limit = RateLimit::from_columns(
            row.try_get(1).map_err(|e| e.to_string())?,
            row.try_get(2).map_err(|e| e.to_string())?,
        );
        let wait_ms: Option<i32> = row.try_get(3).map_err(|e| e.to_string())?;
        let Some(limit) = limit else {
            return Ok(Lease::Unlimited);
        };
        // A lease of 2 % of the limit: a few round trips per interval for the whole fleet,
        // and little budget stranded in one worker while another waits.
        let size = (limit.calls / 50).max(1);
        account.lease_size.store(size, Ordering::Relaxed);
        if granted <= 0 {
            let wait = u64::try_from(wait_ms.unwrap_or(1)).unwrap_or(1).max(1);
            return Ok(Lease::Empty {
                wait: Duration::from_millis(wait),
            });
        }
        Ok(Lease::Granted {
            calls: u32::try_from(granted).unwrap_or(1),
            ttl: (limit.per / 40).max(Duration::from_millis(50)),
        })
    }

    /// How long the org's runs are deferred: while its last seen usage is above
    /// `rate_limits.salesforce_defer`, until `salesforce_defer_for` after it was seen (then
    /// one call goes out and reads the usage again).
    fn salesforce_deferral(&self, account: &Account) -> Option<Duration> {
        let state = lock(&account.salesforce);
        let (usage, seen) = state.usage?;
        let elapsed = seen.elapsed();
        (usage.share() >= self.settings.salesforce_defer
            && elapsed < self.settings.salesforce_defer_for)
            .then(|| self.settings.salesforce_defer_for - elapsed)
    }

    /// Above `rate_limits.salesforce_slow_down`, spaces the org's calls in this worker by
    /// `salesforce_slow_interval`. `Err` is the wait, when it ends past `deadline`.
    async fn salesforce_pace(&self, account: &Account, deadline: Instant) -> Result<(), Duration> {
        let at = {
            let mut state = lock(&account.salesforce);
            let slow = state
                .usage
                .is_some_and(|(usage, _)| usage.share() >= self.settings.salesforce_slow_down);
            if !slow {
                return Ok(());
            }
            let now = Instant::now();
            let at = state.next_call.filter(|at| *at > now).unwrap_or(now);
            if at > deadline {
                return Err(at - now);
            }
            state.next_call = Some(at + self.settings.salesforce_slow_interval);
            at
        };
        tokio::time::sleep_until(at).await;
        Ok(())
    }

    /// After the step (or after deciding not to run it): charges the requests it made beyond
    /// the calls paid for (its ticket's, and a batch call's it took), gives back unused ones, and keeps what the provider's
    /// headers said. `observer` is `None` when the step did not run.
    pub fn finish(&self, ticket: Ticket, observer: Option<&Observer>) {
        let Some(account) = ticket.account else {
            return;
        };
        let requests = observer.map_or(0, Observer::requests);
        let paid = ticket.paid + observer.map_or(0, Observer::prepaid);
        self.metrics
            .provider_calls
            .get_or_create(&label("provider", account.provider.as_str()))
            .inc_by(u64::from(requests));
        if requests < paid {
            if let Ok(mut budget) = account.budget.try_lock() {
                budget.tokens += paid - requests;
            }
        } else if requests > paid {
            account.debt.fetch_add(requests - paid, Ordering::Relaxed);
        }
        let Some(observer) = observer else { return };
        let hubspot = observer.hubspot();
        let salesforce = observer.salesforce();
        if let Some(limit) = hubspot {
            self.learn_hubspot(&account, limit);
        }
        if let Some(usage) = salesforce {
            self.watch_salesforce(&account, usage);
        }
        if hubspot.is_some() || salesforce.is_some() {
            self.note(&account, hubspot, salesforce);
        }
    }

    fn learn_hubspot(&self, account: &Account, limit: HubspotLimit) {
        if let Some(remaining) = limit.remaining {
            self.metrics
                .budget_remaining
                .get_or_create(&label("connection", account.id.to_string()))
                .set(f64::from(remaining));
        }
        if limit.remaining == Some(0) {
            self.drain(account);
        }
        let mut known = lock(&account.hubspot);
        let changed = known.is_none_or(|k| k.max != limit.max || k.interval != limit.interval);
        *known = Some(limit);
        if changed {
            tracing::info!(connection_id = %account.id, max = limit.max, interval = ?limit.interval, "learned HubSpot's rate limit for the account");
            // The next lease reads it from the row; what is leased now was for the old one.
            *lock(&account.noted_at) = None;
        }
    }

    fn watch_salesforce(&self, account: &Account, usage: ApiUsage) {
        let share = usage.share();
        let id = account.id.to_string();
        self.metrics
            .salesforce_api_usage
            .get_or_create(&label("connection", id.clone()))
            .set(share);
        self.metrics
            .budget_remaining
            .get_or_create(&label("connection", id))
            .set(usage.max.saturating_sub(usage.used) as f64);
        let mut state = lock(&account.salesforce);
        state.usage = Some((usage, Instant::now()));
        let above = share >= self.settings.salesforce_slow_down;
        if above && !state.warned {
            tracing::warn!(
                connection_id = %account.id,
                used = usage.used,
                max = usage.max,
                "Salesforce org above {:.0} % of its daily API limit: its calls are slowed, and deferred above {:.0} %",
                self.settings.salesforce_slow_down * 100.0,
                self.settings.salesforce_defer * 100.0,
            );
        }
        state.warned = above;
    }

    /// The provider says the account has nothing left: this worker's lease is dropped and
    /// the fleet's bucket emptied (in the background), so no worker keeps calling into 429s.
    fn drain(&self, account: &Account) {
        if let Ok(mut budget) = account.budget.try_lock() {
            budget.tokens = 0;
        }
        let pool = self.pool.clone();
        let id = account.id;
        tokio::spawn(async move {
            let drained = match pool.get().await {
                Ok(client) => client
                    .execute("select drain_rate_budget($1)", &[&id])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = drained {
                tracing::debug!(error = %e, "could not empty the account's budget");
            }
        });
    }

    /// Writes what the provider said to the connection's row, at most once per
    /// `rate_limits.refresh` per worker (at once when HubSpot's limit changed), in the
    /// background: the fleet's leases use the learned limit, `connection list` shows it.
    fn note(&self, account: &Account, hubspot: Option<HubspotLimit>, salesforce: Option<ApiUsage>) {
        {
            let mut noted = lock(&account.noted_at);
            if noted.is_some_and(|at| at.elapsed() < self.settings.refresh) {
                return;
            }
            *noted = Some(Instant::now());
        }
        let pool = self.pool.clone();
        let id = account.id;
        tokio::spawn(async move {
            if let Err(e) = note(&pool, id, hubspot, salesforce).await {
                tracing::debug!(error = %e, "could not note the provider's limit headers");
            }
        });
    }
}

async fn note(
    pool: &Pool,
    id: Uuid,
    hubspot: Option<HubspotLimit>,
    salesforce: Option<ApiUsage>,
) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let calls = hubspot.map(|l| i32::try_from(l.max).unwrap_or(i32::MAX));
    let interval = hubspot.map(|l| i32::try_from(l.interval.as_millis()).unwrap_or(i32::MAX));
    let remaining = hubspot
        .and_then(|l| l.remaining)
        .map(|r| i32::try_from(r).unwrap_or(i32::MAX));
    let used = salesforce.map(|u| i64::try_from(u.used).unwrap_or(i64::MAX));
    let max = salesforce.map(|u| i64::try_from(u.max).unwrap_or(i64::MAX));
    client
        .execute(
            "insert into rate_budgets as b (connection_id, learned_calls, learned_interval_ms, \
             remaining, api_used, api_max, observed_at) \
             select c.id, $2, $3, $4, $5, $6, now() from connections c where c.id = $1 \
             on conflict (connection_id) do update set \
             learned_calls = coalesce(excluded.learned_calls, b.learned_calls), \
             learned_interval_ms = coalesce(excluded.learned_interval_ms, b.learned_interval_ms), \
             remaining = coalesce(excluded.remaining, b.remaining), \
             api_used = coalesce(excluded.api_used, b.api_used), \
             api_max = coalesce(excluded.api_max, b.api_max), observed_at = now()",
            &[&id, &calls, &interval, &remaining, &used, &max],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

enum Lease {
    Unlimited,
    Granted { calls: u32, ttl: Duration },
    Empty { wait: Duration },
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
