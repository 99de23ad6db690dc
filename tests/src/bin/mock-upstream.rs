//! A fast mock upstream for the benchmark: `mock-upstream [ADDR]` prints
//! `listening http://ADDR` and serves until killed.

#![allow(clippy::disallowed_methods)]

use carrel_tests::mock::MockUpstream;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
    let mock = MockUpstream::serve_with(listener, false);
    println!("listening http://{}", mock.addr());
    let _ = tokio::signal::ctrl_c().await;
}
