//! A worker on a three-node RabbitMQ cluster that the test starts on this machine (nodes of
//! their own, with their own names, ports, data directories and cookie, apart from the
//! shared broker): `amqp.url` lists the three nodes, the work queue is replicated on all of
//! them, and stopping the node that leads it while events flow loses nothing, runs nothing
//! twice, and consumption resumes within seconds.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appevents::pipeline::runs::RunStatus;
use appevents::transport::publish::{NewEvent, SendError, SharedPublisher};
use appevents_standin as standin;
use secrecy::SecretString;
use serde_json::json;
use tokio::sync::Mutex;

use crate::support::{CONTACT_CREATED, TestApp, eventually};

/// The RabbitMQ server scripts, run directly (the packaged wrappers switch to the system
/// user and node).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

struct Node {
    name: String,
    amqp_port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
}

struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address")
        .port()
}

impl Cluster {
    /// Three fresh nodes, booted in parallel, the second and third joined to the first.
    async fn start(tag: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("appevents-cluster-{tag}"));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("cluster dir");
        // The cluster's own cookie, in the HOME its nodes and rabbitmqctl run with.
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("APPEVENTSTEST{tag}").to_uppercase()).expect("cookie");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("cookie mode");
        let none = dir.join("none");
        let plugins = dir.join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").expect("plugins file");
        let nodes: Vec<Node> = ["a", "b", "c"]
            .iter()
            .map(|letter| {
                let name = format!("rabbit-test-{tag}-{letter}@localhost");
                let amqp_port = free_port();
                let base = dir.join(letter);
                let env = [
                    ("HOME", home.display().to_string()),
                    ("RABBITMQ_NODENAME", name.clone()),
                    ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
                    ("RABBITMQ_NODE_PORT", amqp_port.to_string()),
                    ("RABBITMQ_DIST_PORT", free_port().to_string()),
                    (
                        "RABBITMQ_MNESIA_BASE",
                        base.join("mnesia").display().to_string(),
                    ),
                    ("RABBITMQ_LOG_BASE", base.join("log").display().to_string()),
                    ("RABBITMQ_CONFIG_FILE", none.display().to_string()),
                    ("RABBITMQ_ADVANCED_CONFIG_FILE", none.display().to_string()),
                    ("RABBITMQ_CONF_ENV_FILE", none.display().to_string()),
                    (
                        "RABBITMQ_ENABLED_PLUGINS_FILE",
                        plugins.display().to_string(),
                    ),
                    ("RABBITMQ_ENABLED_PLUGINS", String::new()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                Node {
                    name,
                    amqp_port,
                    env,
                    log: dir.join(format!("{letter}.out")),
                }
            })
            .collect();
        let cluster = Cluster { dir, nodes };
        futures::future::join_all((0..3).map(|i| cluster.boot(i))).await;
        let first = cluster.nodes[0].name.clone();
        for i in 1..3 {
            cluster.ctl(i, &["stop_app"]).await;
            cluster.ctl(i, &["join_cluster", &first]).await;
            cluster.ctl(i, &["start_app"]).await;
        }
        cluster
    }

    /// Starts node `i` and waits until it accepts AMQP connections.
    async fn boot(&self, i: usize) {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("node log");
        tokio::process::Command::new(Path::new(RABBITMQ_BIN).join("rabbitmq-server"))
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .expect("rabbitmq-server");
        // The node registers its name only once booted far enough: wait for its AMQP
        // listener, then for the boot to complete.
        let address = format!("127.0.0.1:{}", node.amqp_port);
        let listening = eventually(Duration::from_secs(120), || async {
            tokio::net::TcpStream::connect(&address).await.is_ok()
        })
        .await;
        assert!(
            listening,
            "{} never listened: {}",
            node.name,
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
        let booted = eventually(Duration::from_secs(120), || async {
            self.try_ctl(i, &["await_startup", "--timeout", "10"])
                .await
                .is_ok()
        })
        .await;
        assert!(booted, "{} never booted", node.name);
    }

    async fn try_ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let node = &self.nodes[i];
        let output = tokio::process::Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .args(["-n", &node.name, "--quiet"])
            .args(args)
            .output()
            .await
            .expect("rabbitmqctl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "rabbitmqctl {args:?} on {}: {stdout}{}\nnode log: {}",
                node.name,
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(&node.log).unwrap_or_default()
            ))
        }
    }

    async fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.try_ctl(i, args)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn amqp_url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.amqp_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The leader and members of `queue`, as node `i` sees them.
    async fn queue_placement(&self, i: usize, queue: &str) -> (String, Vec<String>) {
        let out = self
            .ctl(
                i,
                &[
                    "list_queues",
                    "name",
                    "leader",
                    "members",
                    "--no-table-headers",
                ],
            )
            .await;
        let line = out
            .lines()
            .find(|l| l.split('\t').next() == Some(queue))
            .unwrap_or_else(|| panic!("{queue} not listed: {out}"));
        let fields: Vec<&str> = line.split('\t').collect();
        let members = fields[2]
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|m| m.trim().trim_matches('\'').to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        (fields[1].to_owned(), members)
    }

    fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not a node of the cluster"))
    }
}

impl Drop for Cluster {
    /// Stops every node, even when the test failed; their data goes with the directory.
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = std::process::Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
                .envs(node.env.iter().map(|(k, v)| (k, v)))
                .args(["-n", &node.name, "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes `count` events, one every few milliseconds, each until the broker confirms it
/// (republishing an event after a failure is harmless: its id makes it the same event).
/// Returns when each was confirmed.
async fn publish_steadily(
    publisher: Arc<SharedPublisher>,
    count: usize,
    confirmed: Arc<Mutex<BTreeMap<usize, Instant>>>,
) {
    for i in 0..count {
        let event = NewEvent {
            id: Some(format!("evt-cluster-{i}")),
            name: CONTACT_CREATED.to_owned(),
            user_id: "u".to_owned(),
            payload: json!({"email": format!("cluster-{i}@example.com")}),
            occurred_at: None,
        };
        loop {
            match publisher.publish(&event).await {
                Ok(_) => break,
                Err(SendError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("event {i} refused: {err:?}"),
            }
        }
        confirmed.lock().await.insert(i, Instant::now());
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// The events whose run succeeded.
async fn succeeded(app: &TestApp) -> HashSet<String> {
    app.all_runs()
        .await
        .into_iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .map(|r| r.event_id)
        .collect()
}

#[tokio::test]
async fn stopping_the_node_leading_the_work_queue_loses_nothing_and_runs_nothing_twice() {
    const EVENTS: usize = 400;
    let started = Instant::now();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let cluster = Cluster::start(&tag).await;
    let formed = started.elapsed();
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let url = cluster.amqp_url();
    let mut app = TestApp::with_settings(|s| s.amqp.url = SecretString::from(url)).await;
    app.hubspot_workflow(&crm.url()).await;
    let queue = app.settings.amqp.queue.clone();

    let (leader, members) = cluster.queue_placement(0, &queue).await;
    let all: HashSet<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(
        members.iter().cloned().collect::<HashSet<_>>(),
        all,
        "the work queue is replicated on every node"
    );

    app.start_worker().await;
    let publisher = Arc::new(SharedPublisher::new(app.settings.clone()));
    let confirmed = Arc::new(Mutex::new(BTreeMap::new()));
    let publishing = tokio::spawn(publish_steadily(
        publisher.clone(),
        EVENTS,
        confirmed.clone(),
    ));
    // Events flow: some are done, more are coming.
    let flowing = eventually(Duration::from_secs(30), || async {
        succeeded(&app).await.len() >= EVENTS / 4
    })
    .await;
    assert!(flowing, "events flow through the worker");

    let leader_index = cluster.index_of(&leader);
    cluster.ctl(leader_index, &["stop"]).await;
    let stopped = Instant::now();
    // Resumed: an event first confirmed after the stop has been processed.
    let resumed = eventually(Duration::from_secs(60), || async {
        let after: Vec<usize> = confirmed
            .lock()
            .await
            .iter()
            .filter(|(_, at)| **at > stopped)
            .map(|(i, _)| *i)
            .collect();
        let done = succeeded(&app).await;
        after
            .iter()
            .any(|i| done.contains(&format!("evt-cluster-{i}")))
    })
    .await;
    let resume = stopped.elapsed();
    assert!(
        resumed,
        "consumption resumed after {leader} stopped: {} events confirmed since, {} succeeded, consumer connected: {}",
        confirmed
            .lock()
            .await
            .values()
            .filter(|at| **at > stopped)
            .count(),
        succeeded(&app).await.len(),
        app.worker().context.metrics.consumer_connected.get()
    );
    let (new_leader, _) = cluster
        .queue_placement((leader_index + 1) % 3, &queue)
        .await;

    cluster.boot(leader_index).await;
    let back = stopped.elapsed();
    tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .expect("every event published within 2 minutes")
        .expect("publisher");
    let settled = eventually(Duration::from_secs(60), || async {
        succeeded(&app).await.len() >= EVENTS
    })
    .await;
    let runs = app.all_runs().await;
    let records = crm.standin.records();
    let twice: Vec<_> = records.iter().filter(|r| r.creates > 1).collect();
    let claimed_again = runs.iter().filter(|r| r.claims > 1).count();
    let (_, members_after) = cluster.queue_placement(leader_index, &queue).await;
    println!(
        "cluster failover: cluster formed in {:.1}s; leader {leader} stopped, consumption resumed after {:.1}s (new leader {new_leader}), node back after {:.1}s; {EVENTS} events published, {} runs, {} succeeded, {} claimed again, {} records, {} created twice; whole test {:.1}s",
        formed.as_secs_f64(),
        resume.as_secs_f64(),
        back.as_secs_f64(),
        runs.len(),
        runs.iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count(),
        claimed_again,
        records.len(),
        twice.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(settled, "every event settled: {} runs", runs.len());
    assert_eq!(runs.len(), EVENTS, "one run per event");
    assert_eq!(records.len(), EVENTS, "one record per event, nothing lost");
    assert!(twice.is_empty(), "nothing run twice: {twice:#?}");
    assert!(
        resume <= Duration::from_secs(15),
        "resumed after {resume:?}"
    );
    assert_eq!(
        members_after.len(),
        3,
        "the restarted node is a member again"
    );

    app.cleanup().await;
    drop(cluster);
}
