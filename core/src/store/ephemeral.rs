//! Short-lived shared state: counters over a window, flags with a time to live. Sign-in
//! lockouts, kiosk throttles, patron sessions' idle timers and single-use OIDC nonces live
//! here, never in the log: they change on every attempt and mean nothing a day later.
//!
//! On the embedded backend they are a map in this process; on the Redis backend they are
//! Redis keys `{P}:t:<name>` with a TTL, so every replica sees the same counts. Names are
//! built from references and ids only (`lock:pat_…`), never from a card number or a code.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::StoreError;

/// How long one Redis call may take before it counts as a failure.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// Increments a counter, starting its window on the first increment. KEYS: the counter;
/// ARGV: window in ms. Returns the count.
const COUNT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// Where the state lives.
pub(crate) enum Ephemeral {
    Memory(Mutex<HashMap<String, (u64, Instant)>>),
    Redis {
        conn: redis::aio::ConnectionManager,
        tag: String,
        count: redis::Script,
    },
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ephemeral::Memory(_) => "Ephemeral(memory)",
            Ephemeral::Redis { .. } => "Ephemeral(redis)",
        })
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Ephemeral {
    pub(crate) fn memory() -> Ephemeral {
        Ephemeral::Memory(Mutex::default())
    }

    pub(crate) fn redis(conn: redis::aio::ConnectionManager, prefix: &str) -> Ephemeral {
        Ephemeral::Redis {
            conn,
            tag: format!("{{{prefix}}}:t:"),
            count: redis::Script::new(COUNT),
        }
    }

    /// Runs `f` on the live entries of the map, dropping expired ones it meets.
    fn with_map<T>(
        map: &Mutex<HashMap<String, (u64, Instant)>>,
        f: impl FnOnce(&mut HashMap<String, (u64, Instant)>, Instant) -> T,
    ) -> T {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Expired entries are swept now and then, so a flood of names cannot grow the map
        // without bound between reads.
        if map.len() > 4096 {
            map.retain(|_, (_, until)| *until > now);
        }
        f(&mut map, now)
    }

    async fn call_redis<T: redis::FromRedisValue>(
        conn: &redis::aio::ConnectionManager,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = conn.clone();
        tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async(&mut conn))
            .await
            .map_err(|_| unavailable("redis timed out"))?
            .map_err(unavailable)
    }

    /// Adds one to `name`, whose window starts at its first increment; returns the count.
    pub(crate) async fn count(&self, name: &str, window: Duration) -> Result<u64, StoreError> {
        match self {
            Ephemeral::Memory(map) => Ok(Self::with_map(map, |m, now| {
                let entry = m.entry(name.to_owned()).or_insert((0, now + window));
                if entry.1 <= now {
                    *entry = (0, now + window);
                }
                entry.0 += 1;
                entry.0
            })),
            Ephemeral::Redis { conn, tag, count } => {
                let mut conn = conn.clone();
                let mut invocation = count.key(format!("{tag}{name}"));
                invocation.arg(ms(window));
                tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
                    .await
                    .map_err(|_| unavailable("redis timed out"))?
                    .map_err(unavailable)
            }
        }
    }

    /// The count of `name` (0 when it is not set or has expired).
    pub(crate) async fn get(&self, name: &str) -> Result<u64, StoreError> {
        match self {
            Ephemeral::Memory(map) => Ok(Self::with_map(map, |m, now| {
                m.get(name)
                    .filter(|(_, until)| *until > now)
                    .map_or(0, |(n, _)| *n)
            })),
            Ephemeral::Redis { conn, tag, .. } => {
                let n: Option<u64> =
                    Self::call_redis(conn, redis::Cmd::get(format!("{tag}{name}"))).await?;
                Ok(n.unwrap_or(0))
            }
        }
    }

    /// Sets `name` for `ttl`.
    pub(crate) async fn set(&self, name: &str, ttl: Duration) -> Result<(), StoreError> {
        match self {
            Ephemeral::Memory(map) => {
                Self::with_map(map, |m, now| m.insert(name.to_owned(), (1, now + ttl)));
                Ok(())
            }
            Ephemeral::Redis { conn, tag, .. } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{tag}{name}"))
                    .arg(1)
                    .arg("PX")
                    .arg(ms(ttl));
                Self::call_redis::<()>(conn, cmd).await
            }
        }
    }

    /// Gives `name` a fresh `ttl` if it is still set; whether it was.
    pub(crate) async fn touch(&self, name: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Ephemeral::Memory(map) => Ok(Self::with_map(map, |m, now| match m.get_mut(name) {
                Some(entry) if entry.1 > now => {
                    entry.1 = now + ttl;
                    true
                }
                _ => false,
            })),
            Ephemeral::Redis { conn, tag, .. } => {
                let mut cmd = redis::cmd("PEXPIRE");
                cmd.arg(format!("{tag}{name}")).arg(ms(ttl));
                Self::call_redis(conn, cmd).await
            }
        }
    }

    /// Removes `name`; whether it was set (so exactly one caller takes a single-use name).
    pub(crate) async fn take(&self, name: &str) -> Result<bool, StoreError> {
        match self {
            Ephemeral::Memory(map) => Ok(Self::with_map(map, |m, now| {
                m.remove(name).is_some_and(|(_, until)| until > now)
            })),
            Ephemeral::Redis { conn, tag, .. } => {
                let n: u64 =
                    Self::call_redis(conn, redis::Cmd::del(format!("{tag}{name}"))).await?;
                Ok(n == 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_expire_with_their_window_and_names_are_taken_once() {
        let e = Ephemeral::memory();
        let w = Duration::from_secs(60);
        assert_eq!(e.count("a", w).await.unwrap(), 1);
        assert_eq!(e.count("a", w).await.unwrap(), 2);
        assert_eq!(e.get("a").await.unwrap(), 2);
        tokio::time::advance(w).await;
        assert_eq!(e.get("a").await.unwrap(), 0);
        assert_eq!(e.count("a", w).await.unwrap(), 1, "a new window");

        e.set("s", Duration::from_secs(10)).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(e.touch("s", Duration::from_secs(10)).await.unwrap());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(e.touch("s", Duration::from_secs(10)).await.unwrap(), "slid");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !e.touch("s", Duration::from_secs(10)).await.unwrap(),
            "idle"
        );

        e.set("n", Duration::from_secs(10)).await.unwrap();
        assert!(e.take("n").await.unwrap());
        assert!(!e.take("n").await.unwrap());
    }
}
