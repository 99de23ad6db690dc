//! `carrel serve` as a process of its own, for tests that kill it or run several.

use std::path::Path;
use std::process::Stdio;

use carrel_tests::ADMIN_TOKEN;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// `carrel serve` in a child process, killed if the test ends first.
pub struct Serve {
    pub child: Child,
    pub public: String,
    pub admin: String,
}

impl Serve {
    /// Starts it on `dir/carrel.toml` with its data in `dir/data`, with `env` added.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Serve {
        Serve::spawn(dir, env, Stdio::inherit()).await
    }

    /// As [`Serve::start`], with its log written to `log`.
    pub async fn start_logged(dir: &Path, env: &[(&str, &str)], log: &Path) -> Serve {
        let file = std::fs::File::create(log).expect("create the log file");
        Serve::spawn(dir, env, Stdio::from(file)).await
    }

    async fn spawn(dir: &Path, env: &[(&str, &str)], stderr: Stdio) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_carrel-e2e"))
            .arg("serve")
            .arg("--config")
            .arg(dir.join("carrel.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("CARREL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MOCK_API_KEY", "sk-mock")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            // Its log: the test's output, should the test fail, or a file.
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start carrel-e2e");
        // The first line says where it listens: `listening public=http://… admin=http://…`.
        let stdout = child.stdout.take().expect("piped stdout");
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await
            .expect("read stdout")
            .expect("carrel exited before listening");
        let url = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        Serve {
            public: url("public="),
            admin: url("admin="),
            child,
        }
    }

    /// `POST`s to the admin API as the operator; expects 201.
    pub async fn admin(&self, http: &reqwest::Client, path: &str, body: Value) -> Value {
        let resp = http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin request");
        assert_eq!(resp.status(), 201);
        resp.json().await.expect("admin JSON")
    }
}
