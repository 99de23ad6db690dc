//! A TCP proxy a test can cut and restore: Redis made unreachable for one gateway while the
//! machine's Redis keeps serving every other test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards every connection to `upstream` until cut.
pub struct TcpProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// Bumped at each cut: every connection open then is closed.
    cuts: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl TcpProxy {
    /// Listens on a port of its own, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let accept = tokio::spawn({
            let (open, cuts) = (Arc::clone(&open), cuts.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        // Refused the way a dead peer refuses: the connection closes at once.
                        drop(client);
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        TcpProxy {
            addr,
            open,
            cuts,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// The address of the tests' Redis, from [`crate::redis_url`] (`redis://host:port[/db]`).
pub async fn redis_addr() -> SocketAddr {
    let url = crate::redis_url();
    let host_port = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("a TCP redis:// URL is needed here, not {url}"));
    tokio::net::lookup_host(host_port)
        .await
        .expect("resolve Redis")
        .next()
        .expect("an address for Redis")
}
