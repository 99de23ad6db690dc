//! The generic cell rate algorithm (GCRA): a request-rate limit with a burst, kept as one number
//! per limited thing, the theoretical arrival time (TAT) of the next request.
//!
//! A limit of `n` per minute with a burst of `b` admits `b` requests at once and then one every
//! `60 s / n`. This is the algorithm governor implements; Carrel keeps its own few lines so that
//! several levels can be checked and then committed together under one lock (governor commits
//! each check as it makes it), and so the Redis backend can run the same arithmetic in a script.

/// A rate: one request per `emission_ns`, with `burst` allowed back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    emission_ns: u64,
    burst: u32,
}

/// The state of one limited thing: the theoretical arrival time, in the clock's nanoseconds.
pub type Tat = u64;

impl Gcra {
    /// `per_minute` requests a minute with a burst of the same size (a full minute's worth),
    /// as OpenAI's per-minute limits behave. `per_minute` must be positive.
    pub fn per_minute(per_minute: u32) -> Gcra {
        let per_minute = per_minute.max(1);
        Gcra {
            emission_ns: 60_000_000_000 / u64::from(per_minute),
            burst: per_minute,
        }
    }

    /// [`Gcra::per_minute`] for a stored limit (a `u64`; the admin API caps it far below
    /// `u32::MAX`).
    pub fn for_limit(per_minute: u64) -> Gcra {
        Gcra::per_minute(u32::try_from(per_minute).unwrap_or(u32::MAX))
    }

    /// The burst size, which is also the limit reported to clients.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn tolerance_ns(&self) -> u64 {
        self.emission_ns * u64::from(self.burst - 1)
    }

    /// Admits a request at `now`: the new TAT, or how long to wait before one is admitted.
    pub fn check(&self, tat: Tat, now: u64) -> Result<Tat, u64> {
        let tat = tat.max(now);
        let allow_at = tat.saturating_sub(self.tolerance_ns());
        if now < allow_at {
            Err(allow_at - now)
        } else {
            Ok(tat + self.emission_ns)
        }
    }

    /// Requests that would be admitted right now, back to back.
    pub fn remaining(&self, tat: Tat, now: u64) -> u32 {
        let tat = tat.max(now);
        let slack = (now + self.tolerance_ns() + self.emission_ns).saturating_sub(tat);
        (slack / self.emission_ns).min(u64::from(self.burst)) as u32
    }

    /// Nanoseconds until the full burst is available again.
    pub fn reset_ns(&self, tat: Tat, now: u64) -> u64 {
        tat.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let g = Gcra::per_minute(60);
        let mut tat = 0;
        let now = 100 * SEC;
        for i in 0..60 {
            assert_eq!(g.remaining(tat, now), 60 - i);
            tat = g.check(tat, now).unwrap();
        }
        assert_eq!(g.remaining(tat, now), 0);
        assert_eq!(g.check(tat, now), Err(SEC));
        assert_eq!(g.reset_ns(tat, now), 60 * SEC);
        // One second later, exactly one more.
        tat = g.check(tat, now + SEC).unwrap();
        assert!(g.check(tat, now + SEC).is_err());
        // A full minute idle refills the burst.
        assert_eq!(g.remaining(tat, now + 61 * SEC), 60);
    }

    proptest! {
        /// Over any window of a minute, no more than burst + the minute's emissions pass.
        #[test]
        fn never_admits_more_than_the_rate_allows(
            per_minute in 1u32..600,
            gaps in proptest::collection::vec(0u64..2 * SEC, 1..400),
        ) {
            let g = Gcra::per_minute(per_minute);
            let mut tat = 0;
            let mut now = 10 * 60 * SEC;
            let start = now;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                if let Ok(next) = g.check(tat, now) {
                    tat = next;
                    admitted += 1;
                }
            }
            let elapsed = now - start;
            let allowed = u64::from(per_minute) + elapsed / g.emission_ns;
            prop_assert!(admitted <= allowed, "{admitted} > {allowed}");
        }
    }
}
