// Input, the network and the database can fail anywhere outside tests: errors are returned,
// never unwrapped. Unit tests (cfg(test)) may expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

fn main() -> ExitCode {
    appevents::cli::main()
}
