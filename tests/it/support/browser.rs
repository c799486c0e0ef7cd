//! Real headless Chromium through WebDriver (fantoccini), for the pages' tests.
//!
//! One chromedriver serves the whole test binary: started on first use on a port it picks
//! (`--port=0`, read from the line it prints), as the leader of its own process group, under
//! a watchdog shell that kills the group (chromedriver and every Chromium it started) once
//! the test process is gone, since statics are never dropped. Each test gets its own
//! session, with its own profile directory, closed when the test is done, even on a panic.
//! At most two sessions run at once: a Chromium is heavy on two cores.
//!
//! Screenshots go to `docs/screenshots/`, at a desktop (1280×800) and a phone (390×844)
//! viewport, so the docs show what the tests saw.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Semaphore, SemaphorePermit};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Desktop and phone viewports of the screenshots.
pub const DESKTOP: (u32, u32) = (1280, 800);
pub const PHONE: (u32, u32) = (390, 844);

/// The chromedriver of this test binary.
struct Driver {
    port: u16,
    profiles: PathBuf,
}

static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
static SESSIONS: Semaphore = Semaphore::const_new(2);

fn driver() -> &'static Driver {
    match DRIVER.get_or_init(start_driver) {
        Ok(driver) => driver,
        Err(err) => panic!("{err}"),
    }
}

/// Starts chromedriver under a watchdog: `sh` leads a new process group, runs chromedriver
/// in it, and kills the whole group when this test process exits.
fn start_driver() -> Result<Driver, String> {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        return Err(format!(
            "{CHROMEDRIVER} or {CHROMIUM} is missing: apt-get install chromium chromium-driver (.ci/run does)"
        ));
    }
    let watchdog = format!(
        "{CHROMEDRIVER} --port=0 & while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; kill -KILL 0",
        parent = std::process::id()
    );
    let mut child = Command::new("sh")
        .args(["-c", &watchdog])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start chromedriver: {e}"))?;
    let stdout = child.stdout.take().ok_or("no chromedriver output")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        // Read every line, so chromedriver never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent
                && let Some(port) = line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|p| p.trim_end_matches('.').parse::<u16>().ok())
            {
                let _ = tx.send(port);
                sent = true;
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "chromedriver did not start within 20 s".to_owned())?;
    let profiles = std::env::temp_dir().join(format!("appevents-chromium-{}", std::process::id()));
    Ok(Driver { port, profiles })
}

/// A browser session of one test. Closing it ends its Chromium; dropping it without closing
/// (a failed assertion) ends it too.
pub struct Session {
    client: Client,
    id: Option<String>,
    profile: PathBuf,
    _permit: SemaphorePermit<'static>,
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A new session named `name` (its profile directory's name), with a desktop viewport.
pub async fn session(name: &str) -> Session {
    let permit = SESSIONS.acquire().await.expect("the session limit");
    let driver = driver();
    let profile = driver.profiles.join(name);
    let mut capabilities = Capabilities::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--window-size=1280,800", "--lang=en-US",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session");
    let id = client.session_id().await.ok().flatten();
    let session = Session {
        client,
        id,
        profile,
        _permit: permit,
    };
    session.viewport(DESKTOP).await;
    session
}

impl Session {
    /// Sizes the window so the page's viewport is exactly `width`×`height`: a headless
    /// window spends part of its height on the browser's own frame.
    pub async fn viewport(&self, (width, height): (u32, u32)) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("window size");
        let frame = self
            .client
            .execute("return window.outerHeight - window.innerHeight", vec![])
            .await
            .expect("measure the frame")
            .as_u64()
            .unwrap_or(0) as u32;
        self.client
            .set_window_size(width, height + frame)
            .await
            .expect("window size");
    }

    /// Saves the page at both widths as `docs/screenshots/{name}-desktop.png` and
    /// `…-phone.png`; returns their paths. Leaves the desktop viewport on.
    pub async fn screenshots(&self, name: &str) -> [PathBuf; 2] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
        std::fs::create_dir_all(&dir).expect("docs/screenshots");
        let mut saved = Vec::new();
        for (viewport, suffix) in [(PHONE, "phone"), (DESKTOP, "desktop")] {
            self.viewport(viewport).await;
            let png = self.client.screenshot().await.expect("screenshot");
            let path = dir.join(format!("{name}-{suffix}.png"));
            std::fs::write(&path, png).expect("write the screenshot");
            saved.push(path);
        }
        let [phone, desktop]: [PathBuf; 2] = saved.try_into().expect("two screenshots");
        [desktop, phone]
    }

    /// The first element matching `css`, waited for up to 10 s.
    pub async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    /// The text of the first element matching `css`, waited for.
    pub async fn text_of(&self, css: &str) -> String {
        self.element(css).await.text().await.expect("text")
    }

    /// Clicks the first element matching `css`, waited for.
    pub async fn click(&self, css: &str) {
        self.element(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Ends the session and its Chromium.
    pub async fn close(mut self) {
        self.id = None;
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A test that failed midway: delete the session with a plain request, since there
        // may be no runtime left to run the client's own close.
        if let Some(id) = self.id.take() {
            let port = driver().port;
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let request = format!(
                    "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                );
                if stream.write_all(request.as_bytes()).is_ok() {
                    let _ = std::io::Read::read(&mut stream, &mut [0u8; 256]);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
