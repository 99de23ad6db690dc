//! What signing one response costs: the content digest of a chat answer and the Ed25519
//! signature over the RFC 9421 base, per response, on this machine. Not a test (no speed is
//! asserted anywhere); its numbers go to deploy/bench/RESULTS.md.
//!
//!     cargo run --release -p carrel-core --example signing_cost

use std::hint::black_box;
use std::time::Instant;

use carrel_core::signing::{ResponseComponents, SigningKey, content_digest, http_date};

fn main() {
    let key = SigningKey::generate().expect("a key");
    // A chat answer of the size the load benchmark gets (~330 bytes), and a 4 KiB one.
    for size in [330usize, 4096] {
        let body = vec![b'x'; size];
        let n = 20_000;
        let started = Instant::now();
        for i in 0..n {
            let digest = content_digest(black_box(&body));
            let date = http_date(1_795_000_000 + i);
            let signed = key
                .sign_response(
                    &ResponseComponents {
                        status: 200,
                        content_digest: &digest,
                        request_id: "req_0123456789abcdef",
                        model: "gpt-4o-mini",
                        date: &date,
                    },
                    1_795_000_000 + i,
                )
                .expect("signs");
            black_box(signed);
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "{size:>5}-byte body: {per:.1} µs per response (digest + date + Ed25519 signature)"
        );
    }
}
