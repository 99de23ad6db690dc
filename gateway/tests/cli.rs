//! The `carrel` binary as a user runs it: config errors, `--help`, `openapi`, and `demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

const CARREL: &str = env!("CARGO_BIN_EXE_carrel");

/// Runs `carrel serve` with a config file, expecting a start-up failure; returns (exit code, stderr).
fn serve_fails(toml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carrel.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(CARREL)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A config file, environment overrides, and the key the error must name.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn config_errors_name_the_key_in_one_line() {
    let cases: [Case; 5] = [
        ("[server]\nlisen = \"127.0.0.1:1\"\n", &[], "server.lisen"),
        (
            "[upstream]\nresponse_timeout_ms = 0\n",
            &[],
            "upstream.response_timeout_ms",
        ),
        (
            "",
            &[("CARREL__SERVER__LISTEN", "not-an-address")],
            "server.listen",
        ),
        (
            "[[providers]]\nname = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\napi_key_env = \"CARREL_TEST_UNSET_KEY\"\n",
            &[],
            "providers[0].api_key_env",
        ),
        (
            "[[providers]]\nname = \"p\"\nbase_url = \"http://h/v1\"\n[[models]]\nname = \"m\"\nprovider = \"p\"\ntier = \"mythic\"\n",
            &[],
            "models[0].tier",
        ),
    ];
    for (toml, env, key) in cases {
        let (code, stderr) = serve_fails(toml, env);
        assert_eq!(code, 2, "{key}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one clear line: {stderr}");
        assert!(
            lines[0].starts_with(&format!("carrel: config error: {key}: ")),
            "{stderr}"
        );
    }
}

#[test]
fn help_version_and_openapi() {
    let help = Command::new(CARREL).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for sub in ["serve", "demo", "openapi"] {
        assert!(help.contains(sub), "{help}");
    }
    let version = Command::new(CARREL).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("carrel {}", env!("CARGO_PKG_VERSION"))
    );
    let spec = Command::new(CARREL).arg("openapi").output().unwrap();
    assert!(spec.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&spec.stdout).unwrap();
    assert!(doc["paths"]["/admin/v1/institutions"].is_object());
}

/// Kills the child when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `carrel demo` on port 0, with the public address and the API key read from its banner.
struct Demo {
    process: Running,
    public: String,
    key: String,
}

fn start_demo() -> Demo {
    let mut child = Command::new(CARREL)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let process = Running(child);
    let mut lines = BufReader::new(stdout).lines().map(Result::unwrap);
    let first = lines.next().unwrap();
    let public = first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("public=http://"))
        .expect("the first line names the public listener")
        .to_owned();
    let key = lines
        .find_map(|l| {
            l.trim()
                .strip_prefix("API key")
                .map(|rest| rest.trim().to_owned())
        })
        .expect("the banner prints the key");
    assert!(key.starts_with("crl_"));
    // Keep reading whatever else it prints, so its stdout never hits a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Demo {
        process,
        public,
        key,
    }
}

fn http(addr: &str, request: String) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn demo_starts_on_a_fresh_data_dir_and_answers_with_the_printed_key() {
    let Demo {
        process: _running,
        public,
        key,
    } = start_demo();

    let body = r#"{"model":"carrel-demo","stream":true,"messages":[{"role":"user","content":"Hello there"}]}"#;
    let response = http(
        &public,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("text/event-stream"), "{response}");
    assert!(response.contains("demo"), "{response}");
    assert!(response.contains("Your"), "{response}");
    assert!(response.contains("data: [DONE]"), "{response}");

    let refused = http(
        &public,
        "GET /v1/models HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".to_owned(),
    );
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
}

#[test]
fn sigterm_lets_an_open_stream_finish_then_exits_cleanly() {
    let Demo {
        mut process,
        public,
        key,
    } = start_demo();
    let pid = process.0.id().to_string();

    let body =
        r#"{"model":"carrel-demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = TcpStream::connect(&public).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // Wait for the first event, so the signal lands mid-stream.
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }

    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("data: [DONE]"),
        "the stream finished after SIGTERM: {rest}"
    );
    let exit = process.0.wait().unwrap();
    assert!(exit.success(), "clean exit after draining: {exit:?}");
}
