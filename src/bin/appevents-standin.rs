//! The stand-in CRM as its own process: `appevents-standin --listen 127.0.0.1:8099`.

// Input, the network and the database can fail anywhere outside tests: errors are returned,
// never unwrapped. Unit tests (cfg(test)) may expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "appevents-standin",
    about = "A stand-in for Salesforce and HubSpot, for demos and tests"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: String,
    /// Keep no records or request log (for benchmarks: memory stays flat).
    #[arg(long)]
    forget: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(2);
        }
    };
    let running = match appevents::standin::spawn_with(&args.listen, args.forget).await {
        Ok(running) => running,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("stand-in CRM listening on {}", running.url());
    tokio::select! {
        _ = appevents::cli::shutdown_signal() => ExitCode::SUCCESS,
        _ = running.task => ExitCode::FAILURE,
    }
}
