//! The stand-in CRM as its own process: `appevents-standin --listen 127.0.0.1:8099`.
//! Prints `stand-in CRM listening on URL` once it listens (the demo reads that line).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "appevents-standin",
    about = "A stand-in for Salesforce and HubSpot, for demos and tests"
)]
struct Args {
    /// Address to listen on (port 0 for any free port).
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
    let running = match appevents_standin::spawn_with(&args.listen, args.forget).await {
        Ok(running) => running,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("stand-in CRM listening on {}", running.url());
    tokio::select! {
        _ = stopped() => ExitCode::SUCCESS,
        _ = running.task => ExitCode::FAILURE,
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn stopped() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
