//! A fast mock upstream for the benchmark: `mock-upstream [ADDR]` prints
//! `listening http://ADDR` and serves until killed. Every model answers at once, except
//! `slow-model`, which streams a word a second for five minutes (the open-streams benchmark).

#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use carrel_tests::mock::{MockUpstream, Reply, StreamScript};

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
    let mock = MockUpstream::serve_with(listener, false);
    mock.script(
        "slow-model",
        Reply::Stream(StreamScript {
            pieces: vec![" word".to_owned(); 300],
            usage: true,
            chunk_delay: Duration::from_secs(1),
            gate: None,
        }),
    );
    println!("listening http://{}", mock.addr());
    let _ = tokio::signal::ctrl_c().await;
}
