//! Patron sign-in end to end: a library card over SIP2 against pysip2's server (which Carrel's
//! authors did not write), a local list, guest passes, a school's ID tokens from a test issuer,
//! sessions (sign-out, a new sign-in on the kiosk, lockout), and the privacy rule: after it
//! all, the card number and PIN are in no log, no file of the data directory and no Redis key
//! or value.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use carrel_tests::mock::{MockUpstream, Reply, chat_completion};
use carrel_tests::{ADMIN_TOKEN, Gateway, config_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::serve::Serve;

const CARD: &str = "21234000000001";
const BLOCKED_CARD: &str = "21234000000002";
const PIN: &str = "4321";

/// pysip2's server, as a library's ILS.
struct Acs {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

impl Acs {
    async fn start() -> Acs {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sip2_acs.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs (the test command installs pysip2)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next_line()
            .await
            .unwrap()
            .expect("the ACS says its port");
        let port = first
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        Acs {
            _child: child,
            lines,
            port,
        }
    }

    /// The next event line the ACS printed.
    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("the ACS answers in time")
            .unwrap()
            .expect("the ACS is running")
    }

    fn settings(&self) -> Value {
        json!({"kind": "sip2", "host": "127.0.0.1", "port": self.port, "tls": false,
               "login_user": "kiosk-sc", "login_password": "sc-password",
               "location_code": "main", "institution_id": "carrel-test",
               "checksums": true, "charset": "utf-8"})
    }
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// A guest code of `tokens` for the day, made with the admin API.
async fn guest_code(gw: &Gateway, inst: &str, tokens: u64) -> String {
    let (status, passes) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/guest-passes"),
            Some(json!({"tokens": tokens})),
        )
        .await;
    assert_eq!(status, 201, "{passes}");
    passes["data"][0]["code"].as_str().unwrap().to_owned()
}

async fn sign_in(
    http: &reqwest::Client,
    base: &str,
    kiosk: &str,
    body: Value,
) -> reqwest::Response {
    http.post(format!("{base}/v1/patron/sessions"))
        .bearer_auth(kiosk)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Every file under `dir`, read whole.
fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all_files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every key under `prefix` with its value, whatever its type.
async fn redis_dump(prefix: &str) -> Vec<(String, String)> {
    let client = redis::Client::open(carrel_tests::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => redis::Value::Nil,
        };
        out.push((key, format!("{value:?}")));
    }
    out
}

/// A library signs patrons in over SIP2 against pysip2, on the Redis store, with debug logs:
/// valid, wrong PIN (BL=Y, CQ=N), blocked, unknown, lockout, a chat as the patron, sign-out
/// (35 End Patron Session reaches the ILS). Then the card and PIN are nowhere.
#[tokio::test]
async fn library_cards_sign_in_over_sip2_and_leave_no_trace() {
    let mut acs = Acs::start().await;
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = carrel_tests::redis_prefix("patrons-sip2");
    let toml = config_for(&mock.base_url(), &carrel_tests::redis_store_toml(&prefix));
    std::fs::write(dir.path().join("carrel.toml"), toml).unwrap();
    let log_path = dir.path().join("carrel.log");
    let serve = Serve::start_logged(
        dir.path(),
        &[
            ("CARREL_PEPPER", carrel_tests::TEST_PEPPER),
            ("RUST_LOG", "debug"),
        ],
        &log_path,
    )
    .await;
    let http = reqwest::Client::new();
    let admin = |method: Method, path: String, body: Value| {
        let http = http.clone();
        let url = format!("{}{path}", serve.admin);
        async move {
            let resp = http
                .request(method, url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (_, inst) = admin(
        Method::POST,
        "/admin/v1/institutions".into(),
        json!({"name": "Springfield", "kind": "library", "region": "US-IL",
               "timezone": "America/Chicago"}),
    )
    .await;
    let inst = inst["id"].as_str().unwrap().to_owned();
    let (status, view) = admin(
        Method::PUT,
        format!("/admin/v1/institutions/{inst}/patron-auth"),
        acs.settings(),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["login_password_set"], true);
    assert!(!view.to_string().contains("sc-password"));
    let (status, limits) = admin(
        Method::PUT,
        format!("/admin/v1/institutions/{inst}/limits"),
        json!({"patron_tokens_per_day": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{limits}");
    let (_, kiosk) = admin(
        Method::POST,
        format!("/admin/v1/institutions/{inst}/keys"),
        json!({"name": "Kiosk 1", "kind": "kiosk"}),
    )
    .await;
    let kiosk = kiosk["secret"].as_str().unwrap().to_owned();
    let base = serve.public.clone();

    // A valid card.
    let resp = sign_in(&http, &base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    assert_eq!(resp.status(), 201);
    let session: Value = resp.json().await.unwrap();
    assert_eq!(acs.next().await, "login ok");
    assert_eq!(acs.next().await, "patron valid");
    let token = session["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("crs_"));
    assert_eq!(session["idle_timeout_seconds"], 600);
    assert_eq!(session["quota"]["limit"], 5000);
    assert_eq!(session["quota"]["remaining"], 5000);

    // The patron chats; the provider hears nothing about them.
    let mut body = chat_completion("mock-model");
    body["usage"] = json!({"prompt_tokens": 30, "completion_tokens": 70, "total_tokens": 100});
    mock.script("mock-model", Reply::Json { status: 200, body });
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({"model": "mock-model", "user": CARD,
                      "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let upstream = mock.received();
    let sent = upstream.last().expect("the provider got the request");
    assert!(!contains(&sent.body, CARD), "the card went upstream");
    // On the Redis store a request settles just after its response, not before it: until
    // then the session shows the reservation, which is never less than what was used.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = http
            .get(format!("{base}/v1/patron/sessions/current"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let current: Value = resp.json().await.unwrap();
        let used = current["quota"]["used"].as_u64().unwrap();
        assert!(used >= 100, "{current}");
        if used == 100 {
            assert_eq!(current["quota"]["remaining"], 4900, "{current}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never settled: {current}"
        );
    }

    // Wrong PIN: BL=Y but CQ=N.
    let resp = sign_in(&http, &base, &kiosk, json!({"card": CARD, "pin": "0000"})).await;
    assert_eq!(error_code(resp).await, (401, "invalid_credentials".into()));
    assert_eq!(acs.next().await, "patron wrong-pin");
    // A new sign-in (even a failed one) does not end the session; a successful one does.
    // Blocked.
    let resp = sign_in(
        &http,
        &base,
        &kiosk,
        json!({"card": BLOCKED_CARD, "pin": PIN}),
    )
    .await;
    assert_eq!(error_code(resp).await, (403, "patron_blocked".into()));
    assert_eq!(acs.next().await, "patron blocked");
    // Unknown card.
    let resp = sign_in(&http, &base, &kiosk, json!({"card": "999", "pin": PIN})).await;
    assert_eq!(error_code(resp).await, (401, "invalid_credentials".into()));
    assert_eq!(acs.next().await, "patron unknown");

    // Sign-out ends the session here and the patron's session at the ILS.
    let resp = http
        .delete(format!("{base}/v1/patron/sessions/current"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(acs.next().await, "end-session");
    let resp = http
        .get(format!("{base}/v1/patron/sessions/current"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (401, "session_expired".into()));

    // Five wrong PINs lock the card, even with the right PIN after.
    for _ in 0..4 {
        let resp = sign_in(&http, &base, &kiosk, json!({"card": CARD, "pin": "1111"})).await;
        assert_eq!(resp.status(), 401);
        assert_eq!(acs.next().await, "patron wrong-pin");
    }
    let resp = sign_in(&http, &base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (403, "card_locked"));

    // Nothing identifying was kept: not in the log, the data directory or Redis.
    drop(serve);
    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    assert!(files.iter().any(|(p, _)| p.ends_with("carrel.log")));
    assert!(files.iter().any(|(p, _)| p.ends_with("carrel-view.db")));
    for (path, bytes) in &files {
        for secret in [CARD, BLOCKED_CARD, "Ana Lopez", "12 Elm St", "sc-password"] {
            // The config file holds no secrets; the store holds the SIP2 login password as
            // the operator's setting (like a provider key), which is not a patron's.
            if secret == "sc-password" {
                continue;
            }
            assert!(!contains(bytes, secret), "{secret} found in {path}");
        }
        assert!(
            !contains(bytes, &format!("\"pin\":\"{PIN}\"")) && !contains(bytes, "AD4321"),
            "the PIN found in {path}"
        );
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("patron"), "the log was captured at debug");
    for (key, value) in redis_dump(&prefix).await {
        for secret in [CARD, BLOCKED_CARD, "Ana Lopez"] {
            assert!(
                !key.contains(secret) && !value.contains(secret),
                "{secret} in Redis {key}"
            );
        }
    }

    // At the next start, plaintext SIP2 is called out.
    let restart_log = dir.path().join("restart.log");
    let again = Serve::start_logged(
        dir.path(),
        &[("CARREL_PEPPER", carrel_tests::TEST_PEPPER)],
        &restart_log,
    )
    .await;
    drop(again);
    let log = std::fs::read_to_string(&restart_log).unwrap();
    assert!(
        log.contains("SIP2 without TLS") && log.contains(&inst),
        "no start-up warning: {log}"
    );
}

/// An institution without an ILS: a CSV list, guest passes, the kiosk's one session, and the
/// refusals each with its own code.
#[tokio::test]
async fn local_lists_and_guest_passes_sign_patrons_in() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let inst = gw.institution("Smallville").await;
    let (status, _) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/institutions/{inst}/patron-auth"),
            Some(json!({"kind": "local"})),
        )
        .await;
    assert_eq!(status, 200);
    let resp = gw
        .http
        .post(gw.admin_url(&format!("/admin/v1/institutions/{inst}/patrons")))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/csv")
        .body(format!("card,pin\n{CARD},{PIN},minor\n555,9999\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let counts: Value = resp.json().await.unwrap();
    assert_eq!(
        (counts["added"].as_u64(), counts["total"].as_u64()),
        (Some(2), Some(2))
    );
    let resp = gw
        .http
        .post(gw.admin_url(&format!("/admin/v1/institutions/{inst}/patrons")))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{CARD}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let message = resp.text().await.unwrap();
    assert!(
        message.contains("line 1") && !message.contains(CARD),
        "{message}"
    );

    let (_, service) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/keys"),
            Some(json!({"name": "app", "kind": "service"})),
        )
        .await;
    let (_, kiosk) = gw
        .create_key(&inst, json!({"name": "Kiosk", "kind": "kiosk"}))
        .await;
    let base = gw.url("");
    let base = base.trim_end_matches('/');

    let resp = sign_in(
        &gw.http,
        base,
        service["secret"].as_str().unwrap(),
        json!({"card": CARD, "pin": PIN}),
    )
    .await;
    assert_eq!(error_code(resp).await, (403, "not_a_kiosk_key".into()));
    let resp = sign_in(&gw.http, base, &kiosk, json!({"card": CARD})).await;
    assert_eq!(error_code(resp).await, (400, "invalid_sign_in".into()));
    let resp = sign_in(&gw.http, base, &kiosk, json!({"card": CARD, "pin": "0"})).await;
    assert_eq!(error_code(resp).await, (401, "invalid_credentials".into()));
    let resp = sign_in(&gw.http, base, &kiosk, json!({"id_token": "x.y.z"})).await;
    assert_eq!(
        error_code(resp).await,
        (403, "sign_in_method_not_enabled".into())
    );

    let resp = sign_in(&gw.http, base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    assert_eq!(resp.status(), 201);
    let first: Value = resp.json().await.unwrap();
    assert_eq!(first["age_band"], "minor");
    let first = first["token"].as_str().unwrap().to_owned();
    assert_eq!(gw.get("/v1/models", &first).await.status(), 200);

    // Staff make a guest pass; the guest signs in on the same kiosk, which ends the patron's
    // session there.
    let code = guest_code(&gw, &inst, 150).await;
    let (_, listed) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{inst}/guest-passes"),
            None,
        )
        .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert!(
        !listed.to_string().contains(&code[5..9]),
        "codes are shown once"
    );

    let resp = sign_in(
        &gw.http,
        base,
        &kiosk,
        json!({"guest_code": "AAAA-BBBB-CCCC"}),
    )
    .await;
    assert_eq!(error_code(resp).await, (401, "invalid_guest_code".into()));
    let resp = sign_in(
        &gw.http,
        base,
        &kiosk,
        json!({"guest_code": code.to_lowercase().replace('-', " ")}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let guest: Value = resp.json().await.unwrap();
    assert_eq!(guest["quota"]["limit"], 150);
    let guest = guest["token"].as_str().unwrap().to_owned();
    let (status, code_of) = error_code(gw.get("/v1/models", &first).await).await;
    assert_eq!(
        (status, code_of.as_str()),
        (401, "session_expired"),
        "the kiosk's earlier session ended"
    );

    // The guest uses the whole allowance; the code then no longer signs in.
    let mut body = chat_completion("mock-model");
    body["usage"] = json!({"prompt_tokens": 50, "completion_tokens": 100, "total_tokens": 150});
    mock.script("mock-model", Reply::Json { status: 200, body });
    let resp = gw
        .post(
            "/v1/chat/completions",
            &guest,
            &json!({"model": "mock-model", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let resp = gw
        .post(
            "/v1/chat/completions",
            &guest,
            &json!({"model": "mock-model", "max_tokens": 10,
            "messages": [{"role": "user", "content": "more"}]}),
        )
        .await;
    assert_eq!(error_code(resp).await, (429, "insufficient_quota".into()));
    let resp = sign_in(&gw.http, base, &kiosk, json!({"guest_code": code})).await;
    assert_eq!(error_code(resp).await, (403, "guest_pass_exhausted".into()));
}

/// A school signs students in with ID tokens from its identity provider: here a test issuer
/// whose JWKS the harness serves and whose tokens it signs.
#[tokio::test]
async fn school_id_tokens_are_verified_against_the_issuer() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::KeyPair;

    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let public = pair.public_key().as_ref();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
        "alg": "ES256", "x": b64(&public[1..33]), "y": b64(&public[33..65])}]});
    let other = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();

    // The issuer's JWKS endpoint, on port 0.
    let idp = MockUpstream::start().await;
    // The JWKS request names no model: the mock's reply for "" answers it.
    idp.script(
        "",
        Reply::Json {
            status: 200,
            body: jwks,
        },
    );
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let inst = gw.institution("Shelbyville Elementary").await;
    let (status, _) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/groups"),
            Some(json!({"name": "5B", "kind": "class", "tier_ceiling": "baseline"})),
        )
        .await;
    assert_eq!(status, 201);
    let settings = json!({"kind": "oidc", "issuer": "https://idp.school.test",
        "audience": "carrel", "jwks_url": format!("{}/jwks", idp.base_url()),
        "age_claim": "role", "group_claim": "class",
        "age_bands": {"student": "minor", "teacher": "adult"}});
    let (status, body) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/institutions/{inst}/patron-auth"),
            Some(settings),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, kiosk) = gw
        .create_key(&inst, json!({"name": "class app", "kind": "kiosk"}))
        .await;
    let base = gw.url("");
    let base = base.trim_end_matches('/').to_owned();

    let nonce = || async {
        let resp = gw
            .http
            .post(format!("{base}/v1/patron/oidc-nonce"))
            .bearer_auth(&kiosk)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        v["nonce"].as_str().unwrap().to_owned()
    };
    let now = jiff::Timestamp::now().as_second();
    let token = |key: &[u8], claims: Value| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(key)).unwrap()
    };
    let claims = |nonce: &str, aud: &str, exp: i64| {
        json!({"iss": "https://idp.school.test", "aud": aud, "sub": "student-4711",
               "exp": exp, "iat": now, "nonce": nonce, "role": "student", "class": "5B",
               "name": "Bart Simpson"})
    };

    let n = nonce().await;
    let good = token(pkcs8.as_ref(), claims(&n, "carrel", now + 300));
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": good})).await;
    assert_eq!(resp.status(), 201);
    let session: Value = resp.json().await.unwrap();
    assert_eq!(session["age_band"], "minor");
    // The same token again: its nonce was used.
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": good})).await;
    assert_eq!(
        error_code(resp).await,
        (401, "id_token_nonce_invalid".into())
    );

    let n = nonce().await;
    let expired = token(pkcs8.as_ref(), claims(&n, "carrel", now - 3600));
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": expired})).await;
    assert_eq!(error_code(resp).await, (401, "id_token_expired".into()));
    let wrong_aud = token(pkcs8.as_ref(), claims(&n, "someone-else", now + 300));
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": wrong_aud})).await;
    assert_eq!(
        error_code(resp).await,
        (401, "id_token_wrong_audience".into())
    );
    let forged = token(other.as_ref(), claims(&n, "carrel", now + 300));
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": forged})).await;
    assert_eq!(
        error_code(resp).await,
        (401, "id_token_bad_signature".into())
    );
    let no_nonce = token(pkcs8.as_ref(), claims("never-issued", "carrel", now + 300));
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"id_token": no_nonce})).await;
    assert_eq!(
        error_code(resp).await,
        (401, "id_token_nonce_invalid".into())
    );

    // A teacher of 5B is an adult, but 5B's ceiling (baseline) is the session's, not the
    // kiosk key's.
    let n = nonce().await;
    let mut teacher = claims(&n, "carrel", now + 300);
    teacher["role"] = json!("teacher");
    let resp = sign_in(
        &gw.http,
        &base,
        &kiosk,
        json!({"id_token": token(pkcs8.as_ref(), teacher)}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let session: Value = resp.json().await.unwrap();
    assert_eq!(session["age_band"], "adult");
    let token = session["token"].as_str().unwrap();
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let resp = gw
        .post("/v1/chat/completions", token, &chat("renamed"))
        .await;
    assert_eq!(error_code(resp).await, (403, "tier_not_allowed".into()));
    let resp = gw
        .post("/v1/chat/completions", token, &chat("mock-model"))
        .await;
    assert_eq!(resp.status(), 200);
}

/// The kiosk page in headless Chromium, driven by Playwright (`tests/browser/kiosk.test.mjs`):
/// sign in by keyboard, ask, watch the answer stream, see the meter go down, large text and
/// Spanish, then idle sign-out that wipes the transcript.
#[tokio::test]
async fn the_kiosk_page_works_in_a_real_browser() {
    let mock = MockUpstream::start().await;
    mock.script(
        "mock-model",
        Reply::Stream(carrel_tests::mock::StreamScript {
            pieces: ["Libraries ", "lend ", "books, ", "music ", "and ", "more."]
                .map(String::from)
                .to_vec(),
            usage: true,
            chunk_delay: Duration::from_millis(60),
            gate: None,
        }),
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let inst = gw.institution("Kiosk Library").await;
    let put = |path: String, body: Value| {
        let gw = &gw;
        async move {
            let (status, body) = gw.admin(Method::PUT, &path, Some(body)).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    };
    put(
        format!("/admin/v1/institutions/{inst}/patron-auth"),
        json!({"kind": "local"}),
    )
    .await;
    put(
        format!("/admin/v1/institutions/{inst}/limits"),
        json!({"patron_tokens_per_day": 20000}),
    )
    .await;
    let resp = gw
        .http
        .post(gw.admin_url(&format!("/admin/v1/institutions/{inst}/patrons")))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{CARD},{PIN},adult\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, kiosk) = gw
        .create_key(&inst, json!({"name": "Kiosk", "kind": "kiosk"}))
        .await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/browser");
    let out = Command::new("node")
        .arg("kiosk.test.mjs")
        .current_dir(dir)
        .env("CARREL_URL", format!("http://{}", gw.public))
        .env("KIOSK_KEY", &kiosk)
        .env("CARD", CARD)
        .env("PIN", PIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("node runs (the test command installs Node.js, Chromium and playwright-core)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("kiosk: ok"),
        "the kiosk test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A library's system that does not answer, or refuses Carrel's own login, is a 503 with its
/// own code; a kiosk past its sign-ins for the minute is a 429 with `Retry-After`.
#[tokio::test]
async fn a_failing_ils_and_a_busy_kiosk_get_their_own_codes() {
    let mut acs = Acs::start().await;
    let mock = MockUpstream::start().await;
    let extra = "[patrons]\nsign_ins_per_kiosk_per_minute = 3\n";
    let gw = Gateway::start(&config_for(&mock.base_url(), extra)).await;
    let base = gw.url("");
    let base = base.trim_end_matches('/').to_owned();
    let kiosk_of = |settings: Value| {
        let gw = &gw;
        async move {
            let inst = gw.institution("Branch").await;
            let path = format!("/admin/v1/institutions/{inst}/patron-auth");
            let (status, body) = gw.admin(Method::PUT, &path, Some(settings)).await;
            assert_eq!(status, 200, "{body}");
            let (_, kiosk) = gw
                .admin(
                    Method::POST,
                    &format!("/admin/v1/institutions/{inst}/keys"),
                    Some(json!({"name": "Kiosk", "kind": "kiosk"})),
                )
                .await;
            kiosk["secret"].as_str().unwrap().to_owned()
        }
    };

    // Nothing listens where the ILS should be.
    let mut down = acs.settings();
    down["port"] = json!(carrel_tests::closed_port().await.port());
    down["timeout_ms"] = json!(2000);
    let kiosk = kiosk_of(down).await;
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    assert_eq!(error_code(resp).await, (503, "ils_unavailable".into()));

    // The ILS refuses Carrel's login (a configuration mistake, not the patron's).
    let mut refusing = acs.settings();
    refusing["login_password"] = json!("not-the-password");
    let kiosk = kiosk_of(refusing).await;
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    assert_eq!(error_code(resp).await, (503, "ils_login_refused".into()));
    assert_eq!(acs.next().await, "login refused");

    // Three sign-ins a minute on this kiosk; the fourth waits.
    let kiosk = kiosk_of(acs.settings()).await;
    for _ in 0..3 {
        let resp = sign_in(&gw.http, &base, &kiosk, json!({"card": CARD})).await;
        assert_eq!(error_code(resp).await, (400, "invalid_sign_in".into()));
    }
    let resp = sign_in(&gw.http, &base, &kiosk, json!({"card": CARD, "pin": PIN})).await;
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_eq!(error_code(resp).await, (429, "sign_in_throttled".into()));
}

/// A session past its absolute end is refused, however recently it was used (the end is set
/// to the moment of sign-in here, so no test waits four hours).
#[tokio::test]
async fn a_session_ends_at_its_absolute_end() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with(&config_for(&mock.base_url(), ""), |config| {
        config.patrons.session_max = Duration::ZERO;
    })
    .await;
    let inst = gw.institution("Capped").await;
    let code = guest_code(&gw, &inst, 100).await;
    let (_, kiosk) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/keys"),
            Some(json!({"name": "Kiosk", "kind": "kiosk"})),
        )
        .await;
    let base = gw.url("");
    let resp = sign_in(
        &gw.http,
        base.trim_end_matches('/'),
        kiosk["secret"].as_str().unwrap(),
        json!({"guest_code": code}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let session: Value = resp.json().await.unwrap();
    let token = session["token"].as_str().unwrap();
    let (status, code) = error_code(gw.get("/v1/patron/sessions/current", token).await).await;
    assert_eq!((status, code.as_str()), (401, "session_expired"));
}

/// A session whose idle timer ran out is refused and ended. The timer is the store's (shared
/// by replicas); here it is run out by hand, and the session is taken as unseen by this
/// replica, as on a replica other than the one that last renewed it.
#[tokio::test]
async fn a_session_idle_too_long_is_refused() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let inst = gw.institution("Idle").await;
    let (status, passes) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/guest-passes"),
            Some(json!({"tokens": 100})),
        )
        .await;
    assert_eq!(status, 201, "{passes}");
    let (_, kiosk) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/keys"),
            Some(json!({"name": "Kiosk", "kind": "kiosk"})),
        )
        .await;
    let base = gw.url("");
    let resp = sign_in(
        &gw.http,
        base.trim_end_matches('/'),
        kiosk["secret"].as_str().unwrap(),
        json!({"guest_code": passes["data"][0]["code"]}),
    )
    .await;
    let token = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        gw.get("/v1/patron/sessions/current", &token).await.status(),
        200
    );

    let id = &token["crs_".len().."crs_".len() + 16];
    let state = &gw.app.state;
    assert!(
        state.store.take_flag(&format!("idle:{id}")).await.unwrap(),
        "the timer ran"
    );
    state.sessions.evict(id).await;
    let (status, code) = error_code(gw.get("/v1/patron/sessions/current", &token).await).await;
    assert_eq!((status, code.as_str()), (401, "session_expired"));
    // Ended for good: the row is gone too.
    assert!(state.store.patron_session(id).await.unwrap().is_none());
}
