//! Micro-benchmarks of what every request pays on the hot path (issue 9): the API key check,
//! the rate limiter, a quota reservation and its settlement, parsing the request's fields,
//! reading a provider's stream for its usage, and signing an answer.
//!
//!   cargo bench -p carrel-gateway --bench hot_path
//!
//! Wall-clock numbers move with the machine; compare runs on one machine, and use
//! `valgrind --tool=callgrind` on the bench binary for instruction counts that repeat.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use carrel_core::domain::{
    InstitutionKind, InstitutionStatus, KeyKind, OverQuota, Principal, Tier,
};
use carrel_core::keys::{NewKey, ParsedKey, Pepper};
use carrel_core::quota::engine::{Demand, OverPolicy, Subject, SystemClock};
use carrel_core::quota::{Level, Limits, LimitsTable, QuotaEngine};
use carrel_core::signing::{ResponseComponents, SigningKey, content_digest, http_date};
use carrel_gateway::metering::body::read_stream;
use carrel_gateway::openai::RequestFields;
use carrel_gateway::tokens::Tokenizer;
use criterion::{Criterion, criterion_group, criterion_main};

/// The small chat request the load benchmark sends.
const CHAT: &[u8] =
    br#"{"model":"bench-model","messages":[{"role":"user","content":"Hello, library!"}]}"#;

/// The ~330-byte answer the load benchmark's mock gives.
const ANSWER: &[u8] = br#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}"#;

fn principal() -> Arc<Principal> {
    Arc::new(Principal {
        institution_id: "inst".into(),
        institution_kind: InstitutionKind::Library,
        timezone: "America/Chicago".into(),
        institution_status: InstitutionStatus::Active,
        frontier_verified: false,
        over_quota: OverQuota::Reject,
        economy: Default::default(),
        key_id: "key".into(),
        site_id: Some("site".into()),
        group_id: None,
        tier_ceiling: Tier::Baseline,
        group_tier_ceiling: None,
        institution_tier_ceiling: Tier::Frontier,
        minor_tier_ceiling: Tier::Baseline,
        attested_until: None,
        allowed_models: None,
        expires_at: None,
        key_kind: KeyKind::Service,
        patron: None,
    })
}

/// An engine with generous limits at the institution, site and key, as production runs with
/// every limit on (none is ever reached here).
fn engine() -> (QuotaEngine, Subject) {
    let engine = QuotaEngine::new(Arc::new(SystemClock::default()));
    let mut table = LimitsTable::default();
    let generous = Limits {
        requests_per_minute: Some(1_000_000_000),
        tokens_per_day: Some(u64::MAX / 8),
        tokens_per_month: Some(u64::MAX / 8),
        cost_per_month_nano_usd: Some(u64::MAX / 8),
        concurrent_streams: Some(1_000_000),
        ..Limits::default()
    };
    table.insert(Level::Institution, "inst", generous);
    table.insert(Level::Site, "site", generous);
    table.insert(Level::Key, "key", generous);
    engine.set_limits(table);
    let subject = Subject {
        principal: principal(),
        patron: None,
        model: Some("bench-model".into()),
    };
    (engine, subject)
}

fn keys(c: &mut Criterion) {
    let pepper = Pepper::from_bytes([7; 32]);
    let key = NewKey::generate();
    let stored = pepper.hash_secret(key.secret());
    c.bench_function("key: parse and verify", |b| {
        b.iter(|| {
            let parsed = ParsedKey::parse(black_box(&key.token)).expect("a key");
            assert!(pepper.verify_secret(parsed.secret, &stored));
        })
    });
}

fn quota(c: &mut Criterion) {
    let (engine, subject) = engine();
    let levels = [Level::Institution, Level::Site, Level::Key];
    c.bench_function("limiter: admit at three levels", |b| {
        b.iter(|| {
            engine
                .admit(black_box(&subject), &levels)
                .expect("admitted")
        })
    });
    let demand = Demand {
        prompt_tokens: 9,
        max_output_tokens: 4096,
        choices: 1,
        input_nano_per_token: 150.0,
        output_nano_per_token: 600.0,
        stream: false,
    };
    c.bench_function("quota: reserve and settle", |b| {
        b.iter(|| {
            let held = engine
                .reserve(black_box(&subject), demand, OverPolicy::Reject)
                .expect("reserved");
            held.settle(14, 4_350);
        })
    });
}

fn parsing(c: &mut Criterion) {
    c.bench_function("request: parse the fields Carrel reads", |b| {
        b.iter(|| RequestFields::parse(black_box(CHAT)).expect("parses"))
    });
    let mut events = String::new();
    for word in ["Hello", " from", " the", " mock", "."] {
        events.push_str(&format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
        ));
    }
    events.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5,\"total_tokens\":14}}\n\ndata: [DONE]\n\n");
    // One event a frame, as providers send them.
    let frames: Vec<Bytes> = events
        .split_inclusive("\n\n")
        .map(|e| Bytes::copy_from_slice(e.as_bytes()))
        .collect();
    let (counted, usage, _) = read_stream(&frames, true, Tokenizer::Bytes);
    assert_eq!((counted, usage.map(|u| u.completion_tokens)), (5, Some(5)));
    c.bench_function("stream: read 7 events for usage", |b| {
        b.iter(|| read_stream(black_box(&frames), true, Tokenizer::Bytes))
    });
}

fn signing(c: &mut Criterion) {
    let key = SigningKey::generate().expect("a key");
    let date = http_date(1_700_000_000);
    c.bench_function("signing: content digest of 330 bytes", |b| {
        b.iter(|| content_digest(black_box(ANSWER)))
    });
    let digest = content_digest(ANSWER);
    c.bench_function("signing: sign an answer", |b| {
        b.iter(|| {
            let components = ResponseComponents {
                status: 200,
                content_digest: &digest,
                request_id: "req_0123456789abcdef",
                model: "bench-model",
                date: &date,
            };
            key.sign_response(black_box(&components), 1_700_000_000)
                .expect("signed")
        })
    });
}

criterion_group!(hot_path, keys, quota, parsing, signing);
criterion_main!(hot_path);
