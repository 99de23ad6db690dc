//! A load generator for what `oha` cannot measure (deploy/bench/bench.py runs it):
//!
//! - `carrel-load stream URL BODY CONCURRENCY SECONDS [TOKEN]`: clients that each post a
//!   streaming request, read it to its end and post the next, for SECONDS; prints one JSON line
//!   with streams/s and the time to first byte (the first body chunk: the first event) and to
//!   the end, p50 and p99 in microseconds.
//! - `carrel-load hold URL BODY STREAMS SECONDS [TOKEN]`: opens STREAMS streams at once (each
//!   on its own connection) and waits until every one has sent its first event, then prints
//!   `open N` and holds them SECONDS (while the caller measures memory) before closing them all
//!   and printing one JSON line.
//!
//! Not a test: the numbers go to deploy/bench/RESULTS.md.

#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

fn usage() -> ! {
    eprintln!(
        "usage: carrel-load stream URL BODY CONCURRENCY SECONDS [TOKEN]\n       \
         carrel-load hold URL BODY STREAMS SECONDS [TOKEN]"
    );
    std::process::exit(2)
}

struct Target {
    client: reqwest::Client,
    url: String,
    body: bytes::Bytes,
    token: Option<String>,
}

impl Target {
    fn request(&self) -> reqwest::RequestBuilder {
        let req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(self.body.clone());
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One streamed request read to its end: (first chunk, end) in microseconds, or None on any
/// error or non-2xx answer.
async fn one_stream(target: &Target) -> Option<(u64, u64)> {
    let start = Instant::now();
    let mut resp = target.request().send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut first = None;
    while let Some(chunk) = resp.chunk().await.ok()? {
        if first.is_none() && !chunk.is_empty() {
            first = Some(start.elapsed().as_micros() as u64);
        }
    }
    Some((first?, start.elapsed().as_micros() as u64))
}

async fn stream(target: Arc<Target>, concurrency: usize, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (target, errors) = (Arc::clone(&target), Arc::clone(&errors));
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                match one_stream(&target).await {
                    Some(t) => seen.push(t),
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            seen
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.expect("a client task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut first: Vec<u64> = all.iter().map(|t| t.0).collect();
    let mut end: Vec<u64> = all.iter().map(|t| t.1).collect();
    first.sort_unstable();
    end.sort_unstable();
    println!(
        "{}",
        json!({
            "streams": all.len(),
            "streams_per_sec": all.len() as f64 / elapsed,
            "ttfb_p50_us": percentile(&first, 0.5),
            "ttfb_p99_us": percentile(&first, 0.99),
            "total_p50_us": percentile(&end, 0.5),
            "total_p99_us": percentile(&end, 0.99),
            "errors": errors.load(Ordering::Relaxed),
        })
    );
}

async fn hold(target: Arc<Target>, streams: usize, seconds: u64) {
    let opened = Arc::new(AtomicU64::new(0));
    let all_open = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let mut held = Vec::new();
    for _ in 0..streams {
        let (target, opened, all_open, release) = (
            Arc::clone(&target),
            Arc::clone(&opened),
            Arc::clone(&all_open),
            Arc::clone(&release),
        );
        held.push(tokio::spawn(async move {
            let released = release.notified();
            let mut resp = target.request().send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            // The first event: the stream is open end to end.
            resp.chunk().await.ok()??;
            if opened.fetch_add(1, Ordering::SeqCst) + 1 == streams as u64 {
                all_open.notify_one();
            }
            // Read on (a slow stream sends now and then) until told to let go.
            tokio::pin!(released);
            loop {
                tokio::select! {
                    _ = &mut released => return Some(()),
                    chunk = resp.chunk() => match chunk {
                        Ok(Some(_)) => {}
                        _ => return None,
                    },
                }
            }
        }));
    }
    let open_wait = Instant::now();
    // Streams that fail never count as open: give up waiting after a minute.
    let _ = tokio::time::timeout(Duration::from_secs(60), all_open.notified()).await;
    let to_open = open_wait.elapsed().as_secs_f64();
    let open = opened.load(Ordering::SeqCst);
    println!("open {open}");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    release.notify_waiters();
    let mut kept = 0;
    for h in held {
        if let Ok(Some(())) = h.await {
            kept += 1;
        }
    }
    println!(
        "{}",
        json!({
            "asked": streams,
            "open": open,
            "seconds_to_open": to_open,
            "held_to_the_end": kept,
        })
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        usage();
    }
    let n: usize = args[4].parse().unwrap_or_else(|_| usage());
    let seconds: u64 = args[5].parse().unwrap_or_else(|_| usage());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .no_proxy()
        .build()
        .expect("an HTTP client");
    let target = Arc::new(Target {
        client,
        url: args[2].clone(),
        body: bytes::Bytes::from(args[3].clone()),
        token: args.get(6).cloned(),
    });
    match args[1].as_str() {
        "stream" => stream(target, n, seconds).await,
        "hold" => hold(target, n, seconds).await,
        _ => usage(),
    }
}
