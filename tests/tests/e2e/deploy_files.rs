//! The deployment files mean what they say: a real redis-server started on
//! `deploy/redis.conf` reports the settings the file promises.

use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

const CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/redis.conf");

/// `redis-cli CONFIG GET name` over a unix socket.
async fn config_get(socket: &std::path::Path, name: &str) -> String {
    let out = Command::new("redis-cli")
        .arg("-s")
        .arg(socket)
        .args(["CONFIG", "GET", name])
        .output()
        .await
        .expect("redis-cli runs (tests/run.sh installs redis-server and redis-cli)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(name), "{text}");
    lines.next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn redis_conf_never_evicts_and_syncs_its_append_only_file_every_second() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    // The file as written, on a private socket and directory instead of the shared port.
    let mut server = Command::new("redis-server")
        .arg(CONF)
        .args(["--port", "0", "--daemonize", "no", "--logfile", ""])
        .arg("--unixsocket")
        .arg(&socket)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server runs (tests/run.sh installs it)");
    let mut log = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let ready = async {
        loop {
            let line =
                log.next_line().await.unwrap().expect(
                    "redis-server exited before it was ready: deploy/redis.conf is invalid",
                );
            // "Ready to accept connections" or "ready to accept connections at <socket>".
            if line
                .to_ascii_lowercase()
                .contains("ready to accept connections")
            {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), ready)
        .await
        .expect("redis-server did not say it was ready within 30 s");
    assert_eq!(config_get(&socket, "appendonly").await, "yes");
    assert_eq!(config_get(&socket, "appendfsync").await, "everysec");
    assert_eq!(config_get(&socket, "maxmemory-policy").await, "noeviction");
    assert_eq!(
        config_get(&socket, "maxmemory").await,
        (1u64 << 30).to_string()
    );
    assert_eq!(config_get(&socket, "save").await, "");
    assert_eq!(config_get(&socket, "protected-mode").await, "yes");
}
