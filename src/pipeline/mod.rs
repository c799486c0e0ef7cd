//! What happens to one message, from delivery to acknowledgement: resolve the workflows its
//! user has on, claim each run, execute the step (refreshing credentials when they
//! expired), decide the run's fate once, settle it (republish, record, count), acknowledge.
//! Around it the consume loop; beside it the dry run and `replay`, an operator's retry of one
//! dead run, and `overview`, the console's figures.
//!
//! Lowest first: `batch`, `runs`, `liveness` (keeps a worker's claims), `resolve`, `retry`, `refresh`; `decision` (pure); the
//! shared `context`; `step` (executing a claimed run), with `chain` running a workflow of
//! several steps and `run_steps` recording each, and `provider_batch` gathering one-step runs into the
//! providers' batch calls, which `ride` sends; `settle`; the unit of work `work`;
//! `consume`. `dry_run` shows a workflow's request without any of it.

pub(crate) mod batch;
pub(crate) mod chain;
pub(crate) mod consume;
pub mod context;
pub(crate) mod decision;
pub(crate) mod dry_run;
pub mod liveness;
pub mod overview;
pub(crate) mod provider_batch;
pub(crate) mod refresh;
pub mod replay;
pub(crate) mod resolve;
pub(crate) mod retry;
pub(crate) mod ride;
pub mod run_steps;
pub mod runs;
pub(crate) mod settle;
pub(crate) mod step;
pub(crate) mod throttle;
pub(crate) mod work;
