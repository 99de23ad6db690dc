//! Quota periods: a day or a month that turns over at the institution's local midnight.
//!
//! A period is named by its local start date and ends at the next local midnight (or the first
//! instant after it, where a daylight-saving change skips midnight, as in America/Santiago or
//! Asia/Beirut). jiff resolves the local wall time with the "compatible" rule, so a day is 23,
//! 24 or 25 hours long around a change and never empty.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// How long a quota lasts before it turns over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// From local midnight to the next.
    Day,
    /// From local midnight of the 1st to that of the 1st of the next month.
    Month,
}

/// One concrete period: its identity and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The local start date, as `yyyymmdd`; equal ids are the same period.
    pub id: i32,
    /// When the next period begins.
    pub resets_at: Timestamp,
}

impl Window {
    /// The period of `kind` that contains `at` in `tz`.
    pub fn containing(kind: Period, at: Timestamp, tz: &TimeZone) -> Window {
        let today = at.to_zoned(tz.clone()).date();
        let (start, next) = match kind {
            Period::Day => (today, today.tomorrow().unwrap_or(Date::MAX)),
            Period::Month => {
                let first = today.first_of_month();
                (first, first.checked_add(1.month()).unwrap_or(Date::MAX))
            }
        };
        Window {
            id: date_id(start),
            resets_at: midnight(next, tz),
        }
    }
}

/// The first instant of local date `date` in `tz`.
fn midnight(date: Date, tz: &TimeZone) -> Timestamp {
    date.to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

fn date_id(date: Date) -> i32 {
    i32::from(date.year()) * 10_000 + i32::from(date.month()) * 100 + i32::from(date.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    #[test]
    fn days_turn_over_at_local_midnight() {
        let w = Window::containing(
            Period::Day,
            ts("2026-11-27T03:00:00Z"),
            &tz("America/Chicago"),
        );
        assert_eq!(w.id, 20261126);
        assert_eq!(w.resets_at, ts("2026-11-27T06:00:00Z"));
    }

    #[test]
    fn daylight_saving_days_are_23_and_25_hours() {
        let ny = tz("America/New_York");
        let spring = Window::containing(Period::Day, ts("2026-03-08T12:00:00Z"), &ny);
        assert_eq!(spring.resets_at, ts("2026-03-09T04:00:00Z"));
        let start = Window::containing(Period::Day, ts("2026-03-08T04:59:00Z"), &ny);
        assert_eq!(start.id, 20260307);
        let autumn = Window::containing(Period::Day, ts("2026-11-01T12:00:00Z"), &ny);
        assert_eq!(autumn.resets_at, ts("2026-11-02T05:00:00Z"));
    }

    #[test]
    fn a_skipped_midnight_resets_at_the_first_instant_after_it() {
        // Santiago moved clocks from 00:00 to 01:00 on 2026-09-06.
        let santiago = tz("America/Santiago");
        let w = Window::containing(Period::Day, ts("2026-09-05T15:00:00Z"), &santiago);
        let local = w.resets_at.to_zoned(santiago);
        assert_eq!((local.date().day(), local.hour()), (6, 1));
    }

    #[test]
    fn months_handle_leap_february_and_year_end() {
        let utc = TimeZone::UTC;
        let feb = Window::containing(Period::Month, ts("2028-02-29T23:59:59Z"), &utc);
        assert_eq!(feb.id, 20280201);
        assert_eq!(feb.resets_at, ts("2028-03-01T00:00:00Z"));
        let dec = Window::containing(Period::Month, ts("2026-12-31T12:00:00Z"), &utc);
        assert_eq!(dec.resets_at, ts("2027-01-01T00:00:00Z"));
        // Auckland's January begins on the 31st of December in UTC.
        let akl = Window::containing(
            Period::Month,
            ts("2026-12-31T12:00:00Z"),
            &tz("Pacific/Auckland"),
        );
        assert_eq!(akl.id, 20270101);
    }

    const ZONES: &[&str] = &[
        "UTC",
        "America/New_York",
        "America/Santiago",
        "Asia/Beirut",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "Asia/Kolkata",
        "Europe/London",
        "America/St_Johns",
    ];

    proptest! {
        #[test]
        fn a_window_contains_its_instant_and_the_next_starts_where_it_ends(
            secs in 946_684_800i64..4_102_444_800,
            zone in proptest::sample::select(ZONES),
            monthly in any::<bool>(),
        ) {
            let zone = tz(zone);
            let kind = if monthly { Period::Month } else { Period::Day };
            let at = Timestamp::from_second(secs).unwrap();
            let w = Window::containing(kind, at, &zone);
            prop_assert!(w.resets_at > at);
            let next = Window::containing(kind, w.resets_at, &zone);
            prop_assert!(next.id > w.id);
            // The instant before the reset still belongs to this window.
            let last = w.resets_at - jiff::SignedDuration::from_nanos(1);
            prop_assert_eq!(Window::containing(kind, last, &zone).id, w.id);
            let hours = (w.resets_at.as_second() - at.as_second()) / 3600;
            match kind {
                // At most a 25-hour day (Lord Howe's half-hour change is within).
                Period::Day => prop_assert!(hours <= 25),
                Period::Month => prop_assert!(hours <= 31 * 24 + 1),
            }
            // The reset is local midnight, or within the hour after it when a change skips it.
            let local = w.resets_at.to_zoned(zone);
            prop_assert!(local.hour() <= 1);
            if kind == Period::Month {
                prop_assert_eq!(local.day(), 1);
            }
        }
    }
}
