//! `appevents users`: the product's end users. `users token` prints a user token, as the
//! product's backend mints one (docs/connect.md), for trying the Connect Portal by hand.

use std::time::Duration;

use clap::Subcommand;

use crate::config::Settings;
use crate::core::user_token::KeyRing;

#[derive(Debug, Subcommand)]
pub(super) enum UsersCommand {
    /// Print a short-lived user token (JWT) signed with user_tokens.signing_key (the token
    /// on stdout; how to open the portal with it on stderr).
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// How long the token is valid, at most user_tokens.max_lifetime.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

pub(super) fn run(settings: &Settings, command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::Token { user, ttl } => {
            let ring = KeyRing::from_settings(&settings.user_tokens)?;
            let token = ring.sign(&user, ttl)?;
            // The token alone on stdout, for scripts; the hint on stderr.
            println!("{token}");
            eprintln!(
                "valid for {}; open the portal once with /portal/{}?token=<the token>",
                humantime::format_duration(ttl),
                crate::integrations::encode_segment(&user)
            );
        }
    }
    Ok(())
}
