//! Carrel's end-to-end test kit: a scriptable mock upstream ([`mock`]) and a harness that runs
//! the real server on port 0 ([`Gateway`]). The tests themselves are in `tests/e2e/`.

#![allow(clippy::disallowed_methods)]

pub mod mock;
pub mod tcp_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use carrel_core::config::Config;
use carrel_gateway::startup::{App, StartOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The operator token every test gateway accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The pepper of every test replica on the Redis backend (replicas must share one).
pub const TEST_PEPPER: &str = "7465737420706570706572207465737420706570706572207465737420706570";

/// The Redis the tests share: `CARREL_TEST_REDIS_URL`, else the machine's.
pub fn redis_url() -> String {
    std::env::var("CARREL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test uses.
pub fn redis_prefix(test: &str) -> String {
    format!("e2e-{test}-{}", carrel_core::ids::random_base62(10))
}

/// The `[store]` section of a replica on `prefix`. Redis gets 2 s rather than 20 ms before a
/// request falls back: a test machine running many tests at once is slow at times, and these
/// tests are about sharing, not about the fallback.
pub fn redis_store_toml(prefix: &str) -> String {
    redis_store_toml_at(&redis_url(), prefix)
}

/// [`redis_store_toml`] with Redis at `url`.
pub fn redis_store_toml_at(url: &str, prefix: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n\
         redis_timeout_ms = 2000\n"
    )
}

/// A replica of the store on `prefix`, up to date with everything Redis holds: what a fresh
/// replica would find.
pub async fn replica_of(prefix: &str) -> carrel_core::store::Store {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let store = carrel_core::store::Store::open_replica(carrel_core::store::RedisSettings {
        url: redis_url(),
        prefix: prefix.to_owned(),
        data_dir: dir,
    })
    .await
    .expect("the tests need Redis (tests/run.sh starts one)");
    store.catch_up().await.expect("catch up");
    store
}

/// Password of the admin accounts that tests create.
pub const PASSWORD: &str = "correct horse battery staple";

/// A Carrel server running in this process on two port-0 listeners. Dropping it shuts it down.
pub struct Gateway {
    /// Public listener address.
    pub public: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// The application (state and store), for white-box checks.
    pub app: App,
    /// HTTP client for the tests.
    pub http: reqwest::Client,
    stop: CancellationToken,
    /// The config file and data directory, kept for [`Gateway::restart`].
    dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Gateway {
    /// Starts Carrel with `toml` as its config file (listeners and data dir are overridden).
    pub async fn start(toml: &str) -> Gateway {
        Gateway::start_with(toml, |_| {}).await
    }

    /// Starts a mock upstream and Carrel on [`config_for`] it, with nothing else configured.
    pub async fn with_mock() -> (mock::MockUpstream, Gateway) {
        let mock = mock::MockUpstream::start().await;
        let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
        (mock, gw)
    }

    /// Creates a key of institution `inst` with the admin API (`body` as
    /// `POST /admin/v1/institutions/{id}/keys` takes it); returns its id and secret.
    pub async fn create_key(&self, inst: &str, body: Value) -> (String, String) {
        let (status, key) = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/v1/institutions/{inst}/keys"),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{key}");
        (
            key["id"].as_str().unwrap().to_owned(),
            key["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Starts Carrel after letting `tweak` adjust the parsed config.
    pub async fn start_with(toml: &str, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("carrel.toml"), toml).expect("write config");
        Gateway::start_in(dir, tweak).await
    }

    /// Stops this server once everything it metered is written, and starts a new one on the
    /// same config and data directory, as a process restart would.
    pub async fn restart(self) -> Gateway {
        self.app.state.ledger.flush().await;
        self.stop.cancel();
        let dir = tempfile::tempdir().expect("temp dir");
        let old = std::mem::replace(&mut { self }.dir, dir);
        Gateway::start_in(old, |_| {}).await
    }

    async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let path = dir.path().join("carrel.toml");
        let mut config = Config::load(Some(&path), std::iter::empty(), &|name| {
            (name == "MOCK_API_KEY").then(|| "sk-mock-provider-key".to_owned())
        })
        .expect("test config is valid");
        config.server.data_dir = dir.path().join("data");
        tweak(&mut config);
        let opts = StartOptions {
            pepper_env: (config.store.kind == carrel_core::config::StoreKind::Redis)
                .then(|| TEST_PEPPER.to_owned()),
            admin_token: Some(ADMIN_TOKEN.to_owned()),
            demo_word_delay: Duration::ZERO,
        };
        let app = App::build(&config, &opts).await.expect("app builds");
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (public_addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let stop = CancellationToken::new();
        let (state, router, server_cfg, token) = (
            app.state.clone(),
            app.admin_router(),
            config.server.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            carrel_gateway::server::run(public, admin, state, router, &server_cfg, token)
                .await
                .expect("server runs");
        });
        Gateway {
            public: public_addr,
            admin: admin_addr,
            app,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stop,
            dir,
        }
    }

    /// A URL on the public listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends an admin request with the operator token; returns status and JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.admin_as(ADMIN_TOKEN, method, path, body).await
    }

    /// Sends an admin request with `token` (a session or automation token); returns status and
    /// JSON body (`Null` when it is not JSON).
    pub async fn admin_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.admin_url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates an institution and a key through the admin API; returns (key id, key string).
    pub async fn new_key(&self, tier_ceiling: Option<&str>) -> (String, String) {
        let (status, inst) = self
            .admin(
                reqwest::Method::POST,
                "/admin/v1/institutions",
                Some(
                    json!({"name": "Test Library", "kind": "library", "region": "US-IL",
                            "timezone": "America/Chicago"}),
                ),
            )
            .await;
        assert_eq!(status, 201, "{inst}");
        let mut body = json!({"name": "test key", "kind": "service"});
        if let Some(t) = tier_ceiling {
            body["tier_ceiling"] = json!(t);
        }
        if tier_ceiling == Some("frontier") {
            // Frontier models also need an institution the operator verified.
            let path = format!("/admin/v1/institutions/{}", inst["id"].as_str().unwrap());
            let verified = json!({"frontier_verified": true});
            let (status, _) = self
                .admin(reqwest::Method::PATCH, &path, Some(verified))
                .await;
            assert_eq!(status, 200);
        }
        let path = format!(
            "/admin/v1/institutions/{}/keys",
            inst["id"].as_str().unwrap()
        );
        let (status, key) = self.admin(reqwest::Method::POST, &path, Some(body)).await;
        assert_eq!(status, 201, "{key}");
        if tier_ceiling == Some("frontier") {
            // ...and, for a service key, the operator's approval of its use case.
            let path = format!(
                "/admin/v1/keys/{}/frontier-attestation",
                key["id"].as_str().unwrap()
            );
            let until = carrel_core::domain::unix_now() + 30 * 86_400;
            let approval = json!({"use_case": "integration tests",
                                  "expires_at": carrel_core::domain::rfc3339(until)});
            let (status, body) = self
                .admin(reqwest::Method::PUT, &path, Some(approval))
                .await;
            assert_eq!(status, 200, "{body}");
        }
        (
            key["id"].as_str().unwrap().to_owned(),
            key["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a library (America/Chicago) through the admin API; returns its id.
    pub async fn institution(&self, name: &str) -> String {
        let (status, inst) = self
            .admin(
                reqwest::Method::POST,
                "/admin/v1/institutions",
                Some(json!({"name": name, "kind": "library", "region": "US-IL",
                            "timezone": "America/Chicago", "sector": "public_library"})),
            )
            .await;
        assert_eq!(status, 201, "{inst}");
        inst["id"].as_str().unwrap().to_owned()
    }

    /// Gives institution `inst` a local patron list: `csv` as `POST …/patrons` takes it
    /// (`card,pin[,age_band]` lines after a header).
    pub async fn local_patrons(&self, inst: &str, csv: &str) {
        let path = format!("/admin/v1/institutions/{inst}");
        let (status, body) = self
            .admin(
                reqwest::Method::PUT,
                &format!("{path}/patron-auth"),
                Some(json!({"kind": "local"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let resp = self
            .http
            .post(self.admin_url(&format!("{path}/patrons")))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/csv")
            .body(csv.to_owned())
            .send()
            .await
            .expect("patron list upload");
        assert_eq!(resp.status(), 200);
    }

    /// Signs a patron in at a kiosk (`kiosk`: the kiosk key's secret); returns the session
    /// token. Signing in ends the kiosk's previous session.
    pub async fn patron_session(&self, kiosk: &str, card: &str, pin: &str) -> String {
        let resp = self
            .http
            .post(self.url("/v1/patron/sessions"))
            .bearer_auth(kiosk)
            .json(&json!({"card": card, "pin": pin}))
            .send()
            .await
            .expect("sign-in request");
        assert_eq!(resp.status(), 201);
        let session: Value = resp.json().await.expect("a session");
        session["token"].as_str().expect("a token").to_owned()
    }

    /// Creates an admin account with [`PASSWORD`] and signs it in; returns the session token.
    pub async fn session(&self, username: &str, role: &str, institution: Option<&str>) -> String {
        let mut body = json!({"username": username, "password": PASSWORD, "role": role});
        if let Some(inst) = institution {
            body["institution_id"] = json!(inst);
        }
        let (status, user) = self
            .admin(reqwest::Method::POST, "/admin/v1/users", Some(body))
            .await;
        assert_eq!(status, 201, "{user}");
        let resp = self
            .http
            .post(self.admin_url("/admin/v1/login"))
            .json(&json!({"username": username, "password": PASSWORD}))
            .send()
            .await
            .expect("login request");
        assert_eq!(resp.status(), 200);
        let session: Value = resp.json().await.expect("login answers JSON");
        session["token"].as_str().unwrap().to_owned()
    }

    /// The admin listener's `/metrics` exposition text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    /// GETs a public path with a key.
    pub async fn get(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request")
    }

    /// POSTs JSON to a public path with a key.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("request")
    }
}

/// A config with the mock as provider `mock` and models of every tier:
/// `mock-model` (baseline), `renamed` → `mock-upstream-name` (advanced), `frontier-model`.
pub fn config_for(mock_base_url: &str, extra: &str) -> String {
    format!(
        r#"
[[providers]]
name = "mock"
base_url = "{mock_base_url}"
api_key_env = "MOCK_API_KEY"

[[models]]
name = "mock-model"
provider = "mock"
tier = "baseline"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.6

[[models]]
name = "renamed"
provider = "mock"
upstream_model = "mock-upstream-name"
tier = "advanced"

[[models]]
name = "frontier-model"
provider = "mock"
tier = "frontier"
{extra}
"#
    )
}

/// The value of one series (name and labels, as exposed) in `metrics`; panics if absent.
pub fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// An error response's status, OpenAI `code` and message (empty strings when the body has
/// none).
pub async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let field = |name: &str| body["error"][name].as_str().unwrap_or_default().to_owned();
    (status, field("code"), field("message"))
}

/// A signed stream's text without its final `event: carrel.signature` (which must be there, and
/// last): what the provider's events looked like on their way through Carrel.
pub fn unsigned(stream: &str) -> &str {
    let at = stream
        .rfind("event: carrel.signature\n")
        .unwrap_or_else(|| panic!("no signature event at the end of the stream: {stream}"));
    let (events, signature) = stream.split_at(at);
    assert!(
        signature.ends_with("}\n\n") && signature.matches("\n\n").count() == 1,
        "the signature event is the last: {signature}"
    );
    events
}

/// An address on which nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}
