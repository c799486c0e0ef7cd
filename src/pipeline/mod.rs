//! What happens to one message, from delivery to acknowledgement: resolve the workflows its
//! user has on, claim each run, execute the step (refreshing credentials when they
//! expired), decide the run's fate once, settle it (republish, record, count), acknowledge.
//! Around it the consume loop; beside it the dry run.

pub(crate) mod batch;
pub(crate) mod dry_run;
pub(crate) mod refresh;
pub mod resolve;
pub(crate) mod retry;
pub mod runs;
pub mod worker;
