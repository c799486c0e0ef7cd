//! `appevents migrate`: create the database if missing, apply the migrations.

use crate::config::Settings;
use crate::store::db;

pub(super) async fn run(settings: &Settings) -> anyhow::Result<()> {
    if db::ensure_database(&settings.database).await? {
        println!(
            "created database {}",
            db::pg_config(settings.database_url())?
                .get_dbname()
                .unwrap_or("?")
        );
    }
    let applied = db::migrate(&settings.database).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    }
    for name in applied {
        println!("applied {name}");
    }
    Ok(())
}
