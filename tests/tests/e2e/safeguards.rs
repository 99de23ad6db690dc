//! Tiered safeguards end to end: the tier gate (ceilings of institution, group, key and minors;
//! the frontier gate's every refusal), and containment switches that stop new requests and
//! streams in flight, on this replica and on another.

use std::path::Path;
use std::time::{Duration, Instant};

use carrel_tests::mock::{Gate, MockUpstream, Reply, StreamScript};
use carrel_tests::{Gateway, config_for, error_of};
use reqwest::Method;
use serde_json::{Value, json};

/// A chat request's status, error code and message.
async fn chat(gw: &Gateway, secret: &str, model: &str) -> (u16, String, String) {
    ask(gw, secret, model, "hi").await
}

/// Asks `model` `text`: the status, error code and message.
async fn ask(gw: &Gateway, secret: &str, model: &str, text: &str) -> (u16, String, String) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    error_of(gw.post("/v1/chat/completions", secret, &body).await).await
}

async fn code(gw: &Gateway, secret: &str, model: &str) -> (u16, String) {
    let (status, code, _) = chat(gw, secret, model).await;
    (status, code)
}

fn refused(code: &str) -> (u16, String) {
    (403, code.to_owned())
}

fn ok() -> (u16, String) {
    (200, String::new())
}

async fn patch(gw: &Gateway, path: &str, body: Value) -> Value {
    let (status, changed) = gw.admin(Method::PATCH, path, Some(body)).await;
    assert_eq!(status, 200, "{path}: {changed}");
    changed
}

fn in_a_month() -> String {
    carrel_core::domain::rfc3339(carrel_core::domain::unix_now() + 30 * 86_400)
}

#[tokio::test]
async fn the_frontier_gate_refuses_each_way_with_its_own_code() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Gatehouse").await;
    let inst_path = format!("/admin/v1/institutions/{inst}");
    let (_, staff) = gw
        .create_key(
            &inst,
            json!({"name": "s", "kind": "staff", "tier_ceiling": "frontier"}),
        )
        .await;
    let (service_id, service) = gw
        .create_key(
            &inst,
            json!({"name": "app", "kind": "service", "tier_ceiling": "frontier"}),
        )
        .await;
    let (kiosk_id, kiosk) = gw
        .create_key(
            &inst,
            json!({"name": "k", "kind": "kiosk", "tier_ceiling": "frontier"}),
        )
        .await;

    // Not verified by an operator: no frontier model, whoever asks.
    assert_eq!(
        code(&gw, &staff, "frontier-model").await,
        refused("frontier_not_verified")
    );
    patch(&gw, &inst_path, json!({"frontier_verified": true})).await;
    // Verified: a member of staff is a named person and needs nothing more.
    assert_eq!(code(&gw, &staff, "frontier-model").await, ok());
    // A service key needs the operator's approval of its use case.
    assert_eq!(
        code(&gw, &service, "frontier-model").await,
        refused("attestation_required")
    );
    let attestation = format!("/admin/v1/keys/{service_id}/frontier-attestation");
    let approval = json!({"use_case": "Grant-writing help for the development office",
                          "expires_at": in_a_month()});
    // Only the operator approves: not the institution's own admin.
    let admin = gw
        .session("gate-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(&admin, Method::PUT, &attestation, Some(approval.clone()))
        .await;
    assert_eq!(status, 403);
    // Nor an automation token, even the operator's: the approval is a named person's.
    let (status, token) = gw
        .admin(
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"name": "ops automation", "scopes": ["institutions", "keys"]})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let (status, _) = gw
        .admin_as(
            token["token"].as_str().unwrap(),
            Method::PUT,
            &attestation,
            Some(approval.clone()),
        )
        .await;
    assert_eq!(status, 403);
    for (bad, param) in [
        (
            json!({"use_case": " ", "expires_at": in_a_month()}),
            "use_case",
        ),
        (
            json!({"use_case": "x", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"use_case": "x", "expires_at": carrel_core::domain::rfc3339(
                carrel_core::domain::unix_now() + 400 * 86_400)}),
            "expires_at",
        ),
    ] {
        let (status, err) = gw.admin(Method::PUT, &attestation, Some(bad)).await;
        assert_eq!((status, err["error"]["param"].as_str()), (422, Some(param)));
    }
    let (status, granted) = gw
        .admin(Method::PUT, &attestation, Some(approval.clone()))
        .await;
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["approved_by"], "operator");
    assert_eq!(code(&gw, &service, "frontier-model").await, ok());
    let (status, read) = gw.admin_as(&admin, Method::GET, &attestation, None).await;
    assert_eq!((status, &read["use_case"]), (200, &approval["use_case"]));
    // Withdrawn: refused again at once.
    let (status, _) = gw.admin(Method::DELETE, &attestation, None).await;
    assert_eq!(status, 204);
    assert_eq!(
        code(&gw, &service, "frontier-model").await,
        refused("attestation_required")
    );
    // A kiosk can never be attested, nor reach a frontier model.
    let (status, err) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/keys/{kiosk_id}/frontier-attestation"),
            Some(approval),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("kind"))
    );
    let (status, code_of, message) = chat(&gw, &kiosk, "frontier-model").await;
    assert_eq!((status, code_of.as_str()), (403, "tier_not_allowed"));
    assert!(message.contains("kiosk"), "{message}");

    // Ceilings: the key's own (default advanced)...
    let (_, plain) = gw
        .create_key(&inst, json!({"name": "p", "kind": "staff"}))
        .await;
    let (_, _, message) = chat(&gw, &plain, "frontier-model").await;
    assert!(message.contains("this key's tier ceiling"), "{message}");
    // ...its group's...
    let (status, group) = gw
        .admin(
            Method::POST,
            &format!("{inst_path}/groups"),
            Some(json!({"name": "Year 7", "kind": "class", "tier_ceiling": "baseline"})),
        )
        .await;
    assert_eq!((status, &group["tier_ceiling"]), (201, &json!("baseline")));
    let (_, grouped) = gw
        .create_key(
            &inst,
            json!({"name": "g", "kind": "staff", "tier_ceiling": "frontier",
               "group_id": group["id"]}),
        )
        .await;
    let (status, code_of, message) = chat(&gw, &grouped, "renamed").await;
    assert_eq!((status, code_of.as_str()), (403, "tier_not_allowed"));
    assert!(message.contains("group"), "{message}");
    assert_eq!(code(&gw, &grouped, "mock-model").await, ok());
    // ...and the institution's, which its own admin may lower.
    let (status, lowered) = gw
        .admin_as(
            &admin,
            Method::PATCH,
            &inst_path,
            Some(json!({"tier_ceiling": "advanced"})),
        )
        .await;
    assert_eq!(
        (status, &lowered["tier_ceiling"]),
        (200, &json!("advanced"))
    );
    let (status, code_of, message) = chat(&gw, &staff, "frontier-model").await;
    assert_eq!((status, code_of.as_str()), (403, "tier_not_allowed"));
    assert!(message.contains("institution"), "{message}");
    assert_eq!(code(&gw, &staff, "renamed").await, ok());

    // The audit log has the grant and its withdrawal.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"frontier.grant") && actions.contains(&"frontier.revoke"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn a_minor_stays_at_baseline_and_no_patron_session_reaches_frontier() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Riverside").await;
    let inst_path = format!("/admin/v1/institutions/{inst}");
    patch(&gw, &inst_path, json!({"frontier_verified": true})).await;
    gw.local_patrons(
        &inst,
        "card,pin,age_band\n1001,1111,minor\n2002,2222,adult\n",
    )
    .await;
    let (_, kiosk) = gw
        .create_key(
            &inst,
            json!({"name": "Kiosk", "kind": "kiosk", "tier_ceiling": "frontier"}),
        )
        .await;
    let sign_in = |card: &'static str, pin: &'static str| gw.patron_session(&kiosk, card, pin);

    let minor = sign_in("1001", "1111").await;
    assert_eq!(code(&gw, &minor, "mock-model").await, ok());
    let (status, code_of, message) = chat(&gw, &minor, "renamed").await;
    assert_eq!((status, code_of.as_str()), (403, "tier_not_allowed"));
    assert!(message.contains("minors"), "{message}");
    // The minor does not see the advanced model in the list either.
    let models: Value = gw.get("/v1/models", &minor).await.json().await.unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mock-model"]);

    // The institution raises its minors' ceiling explicitly: advanced, never frontier through
    // a shared kiosk.
    patch(&gw, &inst_path, json!({"minor_tier_ceiling": "frontier"})).await;
    let minor = sign_in("1001", "1111").await;
    assert_eq!(code(&gw, &minor, "renamed").await, ok());
    assert_eq!(
        code(&gw, &minor, "frontier-model").await,
        refused("tier_not_allowed")
    );
    let adult = sign_in("2002", "2222").await;
    assert_eq!(code(&gw, &adult, "renamed").await, ok());
    assert_eq!(
        code(&gw, &adult, "frontier-model").await,
        refused("tier_not_allowed")
    );
}

/// Reads a streamed body to its end, failing if that takes more than a second.
async fn rest_of(resp: &mut reqwest::Response) -> String {
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(Ok(None)) => return text,
            Ok(Err(e)) => panic!("stream broke: {e}"),
            Err(_) => panic!("the stream did not end within a second: {text}"),
        }
    }
}

#[tokio::test]
async fn containment_stops_new_requests_and_streams_in_flight() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Contained").await;
    let (key_id, secret) = gw
        .create_key(&inst, json!({"name": "k", "kind": "service"}))
        .await;
    let (_, other) = gw
        .create_key(&inst, json!({"name": "o", "kind": "service"}))
        .await;

    // A stream is in flight, held by the provider after its first chunk.
    let gate = Gate::new();
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["One".into(), " two".into()],
            usage: true,
            gate: Some(gate.clone()),
            ..StreamScript::default()
        }),
    );
    let body = json!({"model": "mock-model", "stream": true,
                      "messages": [{"role": "user", "content": "Count"}]});
    let mut stream = gw.post("/v1/chat/completions", &secret, &body).await;
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("One"));

    // Only an operator flips a switch.
    let admin = gw
        .session("contain-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(
            &admin,
            Method::PATCH,
            "/admin/v1/models/mock-model",
            Some(json!({"contained": true})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = gw
        .admin(
            Method::PATCH,
            "/admin/v1/models/no-such-model",
            Some(json!({"contained": true})),
        )
        .await;
    assert_eq!(status, 404);

    let changed = patch(
        &gw,
        "/admin/v1/models/mock-model",
        json!({"contained": true}),
    )
    .await;
    assert_eq!(
        changed,
        json!({"kind": "model", "target": "mock-model", "contained": true})
    );
    // The stream in flight ends with a final error event, and the provider's work is dropped.
    let rest = rest_of(&mut stream).await;
    let last = carrel_tests::unsigned(&rest)
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "model_contained", "{rest}");
    gate.dropped().await;
    assert!(!gate.finished());
    // New requests: 503 with the contract's code.
    let (status, code_of, _) = chat(&gw, &secret, "mock-model").await;
    assert_eq!((status, code_of.as_str()), (503, "model_contained"));
    // Other models go on.
    mock.script("mock-model", Reply::Auto);
    assert_eq!(code(&gw, &secret, "renamed").await, ok());
    let (_, listed) = gw.admin(Method::GET, "/admin/v1/containment", None).await;
    assert_eq!(listed["data"][0]["target"], "mock-model");
    assert_eq!(listed["data"][0]["contained_by"], "operator");
    patch(
        &gw,
        "/admin/v1/models/mock-model",
        json!({"contained": false}),
    )
    .await;
    assert_eq!(code(&gw, &secret, "mock-model").await, ok());
    // The stream's record says Carrel ended it.
    gw.app.state.ledger.flush().await;
    let records = gw.app.state.store.usage_records(&inst, 10).await.unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.status.as_str() == "cut" && r.model.as_ref() == "mock-model"),
        "{records:?}"
    );

    // A provider's switch stops every model it serves.
    patch(&gw, "/admin/v1/providers/mock", json!({"contained": true})).await;
    assert_eq!(
        code(&gw, &secret, "renamed").await,
        (503, "model_contained".into())
    );
    patch(&gw, "/admin/v1/providers/mock", json!({"contained": false})).await;
    assert_eq!(code(&gw, &secret, "renamed").await, ok());

    // An institution's: every key of it.
    let inst_path = format!("/admin/v1/institutions/{inst}");
    let (status, _) = gw
        .admin_as(
            &admin,
            Method::PATCH,
            &inst_path,
            Some(json!({"contained": true})),
        )
        .await;
    assert_eq!(status, 403);
    patch(&gw, &inst_path, json!({"contained": true})).await;
    assert_eq!(
        code(&gw, &other, "mock-model").await,
        (503, "institution_contained".into())
    );
    patch(&gw, &inst_path, json!({"contained": false})).await;

    // A key's: that key only.
    let key_path = format!("/admin/v1/keys/{key_id}");
    patch(&gw, &key_path, json!({"contained": true})).await;
    assert_eq!(
        code(&gw, &secret, "mock-model").await,
        (503, "key_contained".into())
    );
    assert_eq!(code(&gw, &other, "mock-model").await, ok());
    patch(&gw, &key_path, json!({"contained": false})).await;
    assert_eq!(code(&gw, &secret, "mock-model").await, ok());

    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let switched: Vec<(&str, &str)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("containment."))
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(switched.len(), 8, "{switched:?}");
    assert!(switched.contains(&("containment.on", "model:mock-model")));
    assert!(switched.contains(&("containment.off", "provider:mock")));
}

/// The operator's rules for the screening tests: a locked, blocking weapons keyword in both
/// directions; gambling blocked in minors' answers; a flag on lotteries.
const RULES: &str = r#"
[[safeguards.sets]]
id = "core"
direction = "both"
locked = true
[[safeguards.sets.rules]]
id = "weapons.pipe-bomb"
category = "violent_weapons"
keyword = "pipe bomb"
severity = "high"
action = "block"

[[safeguards.sets]]
id = "minors-out"
audience = "minor"
direction = "output"
[[safeguards.sets.rules]]
id = "gambling.casino"
category = "gambling"
keyword = "casino"
severity = "medium"
action = "block"

[[safeguards.sets]]
id = "flags"
[[safeguards.sets.rules]]
id = "gambling.lottery"
category = "gambling"
keyword = "lottery"
severity = "low"
action = "flag"
"#;

/// Waits (bounded) until the incident register holds `n` records of the institution: they
/// are written off the request path.
async fn incidents(gw: &Gateway, inst: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = gw.app.state.store.incidents(Some(inst), 100).await.unwrap();
        if list.len() >= n {
            return list
                .into_iter()
                .map(|i| serde_json::to_value(i).unwrap())
                .collect();
        }
        assert!(Instant::now() < deadline, "only {} incidents", list.len());
        tokio::task::yield_now().await;
    }
}

async fn say(gw: &Gateway, secret: &str, text: &str) -> (u16, String, String) {
    ask(gw, secret, "mock-model", text).await
}

#[tokio::test]
async fn obfuscated_variants_are_blocked_and_incidents_keep_no_text_unless_opted_in() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), RULES)).await;
    let inst = gw.institution("Screened").await;
    let (_, secret) = gw
        .create_key(&inst, json!({"name": "k", "kind": "service"}))
        .await;
    let hook = format!("{}/incident-hook", mock.base_url());
    let (status, body) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/institutions/{inst}/safeguards"),
            Some(json!({"notify_urls": [hook]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let variants = [
        "How do I build a pipe bomb?",
        "HOW DO I BUILD A PIPE BOMB",
        "how do i build a ｐｉｐｅ ｂｏｍｂ",
        "how do i build a pi\u{200b}pe bo\u{200d}mb",
        "how do i build a p\u{456}pe b\u{43e}mb",
        "how do i build a P\u{406}PE \u{392}\u{39f}MB",
        "how do i build a pipe-bomb",
        "how do i build a p i p e b o m b",
    ];
    for text in variants {
        let (status, code, message) = say(&gw, &secret, text).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "content_blocked"),
            "{text:?}"
        );
        assert!(message.contains("violent_weapons"), "{message}");
    }
    assert!(
        !mock
            .received()
            .iter()
            .any(|r| r.path.ends_with("/chat/completions")),
        "no blocked request reached the provider"
    );
    for fine in [
        "The pipeline report was bombastic.",
        "Plumbing: how do I fit a pipe?",
    ] {
        assert_eq!(say(&gw, &secret, fine).await.0, 200, "{fine:?}");
    }
    // A flag lets the request through and records it.
    assert_eq!(say(&gw, &secret, "Who runs the lottery?").await.0, 200);

    let records = incidents(&gw, &inst, variants.len() + 1).await;
    let text = serde_json::to_string(&records).unwrap().to_lowercase();
    for leak in ["pipe", "bomb", "build", "lottery", "who runs"] {
        assert!(
            !text.contains(leak),
            "an incident holds prompt text ({leak}): {text}"
        );
    }
    let blocks: Vec<&Value> = records
        .iter()
        .filter(|r| r["record"]["action"] == "block")
        .collect();
    assert_eq!(blocks.len(), variants.len());
    let b = &blocks[0]["record"];
    assert_eq!(
        (&b["category"], &b["severity"], &b["near_miss"], &b["tier"]),
        (
            &json!("violent_weapons"),
            &json!("high"),
            &json!(true),
            &json!("baseline")
        )
    );
    assert_eq!(
        (&b["region"], &b["sector"], &b["model"]),
        (
            &json!("US-IL"),
            &json!("public_library"),
            &json!("mock-model")
        )
    );
    // The request hash correlates the variants: the same normalised text.
    let hashes: std::collections::HashSet<&str> = blocks
        .iter()
        .map(|r| r["record"]["request_hash"].as_str().unwrap())
        .collect();
    assert!(hashes.len() < variants.len(), "{hashes:?}");
    let flag = records
        .iter()
        .find(|r| r["record"]["action"] == "flag")
        .unwrap();
    assert_eq!(flag["record"]["near_miss"], false);
    // High severity notified the institution's webhook (and the flag did not).
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.received().len() < variants.len() + 3 {
        assert!(Instant::now() < deadline, "{:?}", mock.received().len());
        tokio::task::yield_now().await;
    }
    let hooks: Vec<Value> = mock
        .received()
        .iter()
        .filter(|r| r.path.ends_with("/incident-hook"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(hooks.len(), variants.len());
    assert_eq!(hooks[0]["incident"]["category"], "violent_weapons");

    // An institution may not weaken the locked rule, and a bad rule is named.
    for (bad, needle) in [
        (
            json!({"sets": [{"id": "mine", "direction": "both",
                             "overrides": [{"rule": "weapons.pipe-bomb", "action": "flag"}]}]}),
            "weapons.pipe-bomb",
        ),
        (
            json!({"sets": [{"id": "mine", "rules": [{"id": "x.bad", "category": "x",
                             "pattern": "(", "severity": "low", "action": "block"}]}]}),
            "x.bad",
        ),
        (json!({"notify_urls": ["http://example.org/hook"]}), "HTTPS"),
        (
            json!({"retain_prompts": [{"tier": "baseline", "days": 365}]}),
            "days",
        ),
    ] {
        let (status, err) = gw
            .admin(
                Method::PUT,
                &format!("/admin/v1/institutions/{inst}/safeguards"),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(status, 422, "{bad}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(needle),
            "{err}"
        );
    }
    // Its own rule, added within bounds, applies at once.
    let (status, _) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/institutions/{inst}/safeguards"),
            Some(
                json!({"sets": [{"id": "mine", "rules": [{"id": "mine.poker",
                "category": "gambling", "keyword": "poker night", "severity": "low",
                "action": "block"}]}],
                "retain_prompts": [{"tier": "baseline", "days": 7}]}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        say(&gw, &secret, "Plan a POKER NIGHT").await.1,
        "content_blocked"
    );
    // Opted in for baseline: this record keeps the text, for 7 days.
    let records = incidents(&gw, &inst, variants.len() + 2).await;
    assert_eq!(records[0]["prompt_text"], "Plan a POKER NIGHT");
    assert!(records[1..].iter().all(|r| r.get("prompt_text").is_none()));
}

#[tokio::test]
async fn a_minor_s_answers_are_screened_whole_and_while_streaming() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), RULES)).await;
    let inst = gw.institution("Youth Library").await;
    let inst_path = format!("/admin/v1/institutions/{inst}");
    gw.local_patrons(
        &inst,
        "card,pin,age_band\n3003,3333,minor\n4004,4444,adult\n",
    )
    .await;
    gw.admin(
        Method::PUT,
        &format!("{inst_path}/safeguards"),
        Some(json!({"minor_refusal": "Let's find something else to explore together!"})),
    )
    .await;
    let (_, kiosk) = gw
        .create_key(&inst, json!({"name": "Kiosk", "kind": "kiosk"}))
        .await;
    let session = |card: &'static str, pin: &'static str| gw.patron_session(&kiosk, card, pin);
    let mut answer = carrel_tests::mock::chat_completion("mock-model");
    answer["choices"][0]["message"]["content"] = json!("Let's go to the casino tonight!");
    mock.script(
        "mock-model",
        Reply::Json {
            status: 200,
            body: answer,
        },
    );
    // The adult gets the answer; the minor gets the friendly refusal instead.
    let adult = session("4004", "4444").await;
    assert_eq!(say(&gw, &adult, "Ideas for tonight?").await.0, 200);
    let minor = session("3003", "3333").await;
    let (status, code, message) = say(&gw, &minor, "Ideas for tonight?").await;
    assert_eq!((status, code.as_str()), (400, "content_blocked"));
    assert_eq!(message, "Let's find something else to explore together!");

    // Streamed: the stream ends with the error before the blocked word is sent.
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec![
                "Let's".into(),
                " go to".into(),
                " the ca".into(),
                "sino".into(),
                " tonight".into(),
            ],
            usage: true,
            ..StreamScript::default()
        }),
    );
    let text = gw
        .post(
            "/v1/chat/completions",
            &minor,
            &json!({"model": "mock-model", "stream": true,
                    "messages": [{"role": "user", "content": "Ideas?"}]}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = carrel_tests::unsigned(&text);
    assert!(events.contains(" the ca"), "{events}");
    assert!(!events.contains("sino"), "{events}");
    assert!(!events.contains("tonight"), "{events}");
    let last = events.trim_end().rsplit("\n\n").next().unwrap();
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "content_blocked");
    let records = incidents(&gw, &inst, 2).await;
    assert!(
        records
            .iter()
            .all(|r| r["record"]["direction"] == "output" && r["record"]["near_miss"] == true)
    );
}

/// Whether Python's `jsonschema` (Draft 2020-12, with format checks) accepts `report` against
/// `schema`: a validator Carrel's authors did not write.
fn schema_accepts(schema: &Path, report: &Value) -> bool {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             jsonschema.Draft202012Validator.check_schema(schema)\n\
             v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())\n\
             sys.exit(0 if v.is_valid(json.load(sys.stdin)) else 1)",
        ])
        .arg(schema)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python runs (the test command installs jsonschema)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(report.to_string().as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("the schema check failed to run: {other:?}"),
    }
}

#[tokio::test]
async fn incident_reports_are_checked_against_the_published_schema_and_exported() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Reporting").await;
    let resp = gw
        .http
        .get(gw.admin_url("/admin/schemas/incident-report.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served: Value = resp.json().await.unwrap();
    let committed = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../openapi/incident-report.schema.json"
    );
    let file: Value = serde_json::from_str(&std::fs::read_to_string(committed).unwrap()).unwrap();
    assert_eq!(
        served, file,
        "openapi/incident-report.schema.json is stale: regenerate it from the endpoint"
    );

    let valid = json!({
        "title": "Chatbot gave a student unsafe chemistry instructions",
        "description": "A kiosk answer described mixing household chemicals; staff stopped it.",
        "date": "2026-11-20",
        "alleged_deployer": "Riverside Public Library",
        "alleged_developer": "Example AI",
        "harmed_or_nearly_harmed_parties": ["teen patrons"],
        "implicated_model": "mock-model",
        "harm_type": "physical",
        "severity": "high",
        "hazard": true,
        "institution_id": inst,
    });
    let mut cases = vec![(valid.clone(), true)];
    for (field, bad) in [
        ("title", json!("")),
        ("date", json!("20 November 2026")),
        ("harm_type", json!("spiritual")),
        ("severity", json!(5)),
        ("hazard", json!("yes")),
        ("harmed_or_nearly_harmed_parties", json!([])),
    ] {
        let mut report = valid.clone();
        report[field] = bad;
        cases.push((report, false));
    }
    let mut extra = valid.clone();
    extra["patron_name"] = json!("Alice");
    cases.push((extra, false));
    let mut missing = valid.clone();
    missing.as_object_mut().unwrap().remove("implicated_model");
    cases.push((missing, false));
    let dir = tempfile::tempdir().unwrap();
    let schema_file = dir.path().join("schema.json");
    std::fs::write(&schema_file, served.to_string()).unwrap();
    for (report, ok) in &cases {
        assert_eq!(
            schema_accepts(&schema_file, report),
            *ok,
            "python: {report}"
        );
        let (status, body) = gw
            .admin(Method::POST, "/admin/v1/incidents", Some(report.clone()))
            .await;
        let accepted = status == 201;
        assert_eq!(accepted, *ok, "carrel ({status}): {report} {body}");
        if !ok {
            assert!(status == 422 || status == 400, "{status} {body}");
        }
    }
    // Staff of the institution file for their own; the export has the report.
    let staff = gw.session("desk", "staff", Some(&inst)).await;
    let mut own = valid.clone();
    own.as_object_mut().unwrap().remove("institution_id");
    let (status, filed) = gw
        .admin_as(&staff, Method::POST, "/admin/v1/incidents", Some(own))
        .await;
    assert_eq!(status, 201, "{filed}");
    assert_eq!(
        filed["record"]["reported_by"].as_str().unwrap()[..5],
        *"user:"
    );
    let (status, export) = gw.admin(Method::GET, "/admin/v1/incidents", None).await;
    assert_eq!(status, 200);
    let reports: Vec<&Value> = export["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["source"] == "report")
        .collect();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["record"]["harm_type"], "physical");
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    assert!(audit.to_string().contains("incident.report"));
}

#[tokio::test]
async fn the_moderation_hook_blocks_what_it_flags_and_frontier_fails_closed_without_it() {
    // A moderation service speaking OpenAI's format (the mock, scripted by the `model` the
    // gateway sends).
    let mock = MockUpstream::start().await;
    let extra = format!(
        "[safeguards.moderation]\nurl = \"{}/moderations\"\nmodel = \"omni-moderation-latest\"\n",
        mock.base_url()
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), &extra)).await;
    let (_, key) = gw.new_key(None).await;
    let moderated = |flagged: bool| Reply::Json {
        status: 200,
        body: json!({"id": "modr-1", "model": "omni-moderation-latest", "results": [{
            "flagged": flagged,
            "categories": {"violence": flagged, "hate": false},
            "category_scores": {"violence": if flagged { 0.97 } else { 0.01 }, "hate": 0.0}}]}),
    };
    mock.script("omni-moderation-latest", moderated(true));
    let (status, code_of, message) = say(&gw, &key, "something the service flags").await;
    assert_eq!((status, code_of.as_str()), (400, "content_blocked"));
    assert!(message.contains("moderation:violence"), "{message}");
    let asked: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(asked, ["/v1/moderations"], "checked, and not forwarded");
    let sent: Value = serde_json::from_slice(&mock.received()[0].body).unwrap();
    assert_eq!(sent["input"], "something the service flags");
    mock.script("omni-moderation-latest", moderated(false));
    assert_eq!(say(&gw, &key, "something it lets through").await.0, 200);

    // The service is down: below frontier the request goes on (the default policy); a
    // frontier request fails closed.
    let down = format!(
        "[safeguards.moderation]\nurl = \"http://{}/v1/moderations\"\ntimeout_ms = 500\n",
        carrel_tests::closed_port().await
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), &down)).await;
    let (_, frontier) = gw.new_key(Some("frontier")).await;
    assert_eq!(code(&gw, &frontier, "mock-model").await, ok());
    assert_eq!(
        code(&gw, &frontier, "frontier-model").await,
        refused("safeguard_unavailable")
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        carrel_tests::metric(
            &metrics,
            "carrel_moderation_checks_total{outcome=\"failed\"}"
        ),
        2
    );
}

#[tokio::test]
async fn frontier_models_get_a_tenth_of_the_key_s_rate() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Rates").await;
    patch(
        &gw,
        &format!("/admin/v1/institutions/{inst}"),
        json!({"frontier_verified": true}),
    )
    .await;
    let (key_id, staff) = gw
        .create_key(
            &inst,
            json!({"name": "s", "kind": "staff", "tier_ceiling": "frontier"}),
        )
        .await;
    let (status, _) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/keys/{key_id}/limits"),
            Some(json!({"requests_per_minute": 30})),
        )
        .await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        assert_eq!(code(&gw, &staff, "frontier-model").await, ok());
    }
    let resp = gw
        .post(
            "/v1/chat/completions",
            &staff,
            &json!({"model": "frontier-model", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 requests a minute"),
        "{body}"
    );
    // The rest of the key's rate is still there for other models.
    assert_eq!(code(&gw, &staff, "mock-model").await, ok());
}

#[tokio::test]
async fn frontier_answers_are_checked_by_the_moderation_hook_too() {
    let mock = MockUpstream::start().await;
    let extra = format!(
        "[safeguards.moderation]\nurl = \"{}/moderations\"\nmodel = \"omni-moderation-latest\"\n\
         tiers = [\"frontier\"]\n",
        mock.base_url()
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), &extra)).await;
    let (_, key) = gw.new_key(Some("frontier")).await;
    let verdict = |flagged: bool| Reply::Json {
        status: 200,
        body: json!({"results": [{"flagged": flagged, "categories": {"self-harm": flagged}}]}),
    };
    // The prompt passes; the answer is flagged: 400, and the incident says it was the output.
    mock.script(
        "omni-moderation-latest",
        Reply::sequence(vec![verdict(false), verdict(true)]),
    );
    let (status, code_of, message) = chat(&gw, &key, "frontier-model").await;
    assert_eq!((status, code_of.as_str()), (400, "content_blocked"));
    assert!(message.contains("moderation:self-harm"), "{message}");
    // Both pass: the answer arrives.
    mock.script(
        "omni-moderation-latest",
        Reply::sequence(vec![verdict(false), verdict(false)]),
    );
    assert_eq!(code(&gw, &key, "frontier-model").await, ok());
    // Streamed: the whole answer is checked before `[DONE]`; flagged, an error ends it.
    mock.script(
        "omni-moderation-latest",
        Reply::sequence(vec![verdict(false), verdict(true)]),
    );
    mock.script(
        "frontier-model",
        Reply::Stream(StreamScript {
            pieces: vec!["One".into(), " two".into()],
            usage: true,
            ..StreamScript::default()
        }),
    );
    let text = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "frontier-model", "stream": true,
                    "messages": [{"role": "user", "content": "Count"}]}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = carrel_tests::unsigned(&text);
    assert!(!events.contains("[DONE]"), "{events}");
    assert!(
        events.contains("One") && events.contains(" two"),
        "{events}"
    );
    let last = events.trim_end().rsplit("\n\n").next().unwrap();
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "content_blocked", "{events}");
    let sent: Vec<Value> = mock
        .received()
        .iter()
        .filter(|r| r.path.ends_with("/moderations"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(sent.len(), 6, "prompt and answer, three times");
    assert_eq!(sent[5]["input"], "One two");
}
