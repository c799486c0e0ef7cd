//! `appevents secrets`: keys that encrypt connection secrets.

use clap::Subcommand;

use crate::store::vault;

#[derive(Debug, Subcommand)]
pub(super) enum SecretsCommand {
    /// Print a new random key for secrets.keys.
    GenerateKey,
}

pub(super) fn run(command: SecretsCommand) -> anyhow::Result<()> {
    match command {
        SecretsCommand::GenerateKey => println!("{}", vault::generate_key()?),
    }
    Ok(())
}
