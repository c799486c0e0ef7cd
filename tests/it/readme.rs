//! The README's story, run as written: its shell block, with the built binary, from a
//! directory that is not the checkout (so no config/ directory is near), against this test's
//! own database, exchange and queues and its own stand-in CRM.

use std::time::Duration;

use appevents_standin as standin;

use crate::support::{amqp_url, drop_database, pg_url, test_settings};

/// The first ```sh block after the story's heading.
fn story_block(readme: &str) -> String {
    let story = readme
        .split("## The story, step by step")
        .nth(1)
        .expect("the README has the story");
    let block = story
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the story has a sh block");
    block.to_owned()
}

#[tokio::test]
async fn the_readme_story_runs_from_another_directory() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = story_block(&readme);
    assert!(
        block.starts_with("alias appevents="),
        "the story starts by naming the command: {block}"
    );
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let settings = test_settings(&tag);
    let database_url =
        pg_url(&appevents::store::db::pg_config(settings.database_url()).expect("url"));

    // The alias line becomes the built binary; the stand-in's documented address, this
    // test's. Then wait for what the story promises, with the worker still running.
    let commands: String = block
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n")
        .replace("http://127.0.0.1:8099", &crm.url());
    let script = format!(
        r#"set -euo pipefail
shopt -s expand_aliases
alias appevents='"$APPEVENTS_BIN"'

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
{commands}
for _ in $(seq 1 200); do
  succeeded=$(appevents runs list --user user-123 --status succeeded --json | grep -c '"status": "succeeded"' || true)
  [ "$succeeded" = 2 ] && break
  sleep 0.1
done
echo "succeeded runs: $succeeded"
"#
    );
    let directory = std::env::temp_dir().join(format!("appevents-readme-{tag}"));
    // The story's files are the checkout's examples, at the same relative path.
    let examples = directory.join("examples/workflows");
    std::fs::create_dir_all(&examples).expect("temp dir");
    let checkout = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows");
    for entry in std::fs::read_dir(checkout).expect("examples") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), examples.join(entry.file_name())).expect("copy");
    }

    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&directory)
            .env("APPEVENTS_BIN", env!("CARGO_BIN_EXE_appevents"))
            // The reader's machine: the default environment, its settings built in.
            .env_remove("APPEVENTS_ENVIRONMENT")
            .env_remove("APPEVENTS_CONFIG_DIR")
            .env_remove("RUST_LOG")
            .env("DATABASE_URL", &database_url)
            .env("AMQP_URL", amqp_url())
            .env("APPEVENTS__AMQP__EXCHANGE", &settings.amqp.exchange)
            .env("APPEVENTS__AMQP__QUEUE", &settings.amqp.queue)
            .env(
                "APPEVENTS__AMQP__DEAD_LETTER_QUEUE",
                &settings.amqp.dead_letter_queue,
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the story ends")
    .expect("bash");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();

    // Clean up before asserting: the database, the exchange and the queues of this tag.
    std::fs::remove_dir_all(&directory).ok();
    delete_topology(&settings).await;
    drop_database(&settings).await;

    assert!(
        output.status.success(),
        "the story runs: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("succeeded runs: 2"),
        "two succeeded runs: {stdout}\n{stderr}"
    );
    assert_eq!(crm.standin.records().len(), 2, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("created: contact-to-salesforce")
            && stdout.contains("created: contact-to-hubspot")
            && stdout.contains("dry run: nothing was changed"),
        "the workflow files are applied after their dry run: {stdout}"
    );
    assert!(
        stdout.contains("authorization: Bearer ****") && !stdout.contains("hs-token"),
        "the dry run shows the masked token: {stdout}"
    );
}

async fn delete_topology(settings: &appevents::config::Settings) {
    let (connection, channel) = crate::support::broker_channel().await;
    let topology = crate::support::worker_topology(settings);
    let mut queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];
    queues.extend(topology.retry_queues.iter().map(|(_, q)| q.clone()));
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    let _ = channel
        .exchange_delete(topology.exchange.as_str().into(), Default::default())
        .await;
    let _ = connection.close(200, "test done".into()).await;
}
