//! What the consumer subscribes to: topic names, regular expressions
//! (`^lsst-alerts-.*`), and nightly date templates (`ztf_{YYYYMMDD}_programid1`).
//!
//! ZTF starts a topic each night, named by the UTC date, and keeps
//! advertising old nights for days, so a plain regular expression would also
//! read expired nights. A template follows the UTC date instead: it becomes a
//! regular expression matching tonight's topic and `previous_nights` before
//! it. Because it is a regular expression, librdkafka picks the topic up when
//! it appears (at its next metadata refresh), and [`Subscription::patterns`]
//! changes when the date does, so the consumer re-subscribes at midnight UTC.
//!
//! Invariant: the date comes from a [`Clock`], so tests move it rather than
//! waiting for midnight.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 4] = ["{YYYYMMDD}", "{YYYY}", "{MM}", "{DD}"];

/// Where the time of day comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A UTC calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The UTC date of a moment.
    pub fn of(t: SystemTime) -> Date {
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64) - 1,
        };
        Date::from_days(secs.div_euclid(86_400))
    }

    /// The date `days` days after 1970-01-01 (Howard Hinnant's
    /// `civil_from_days`).
    pub fn from_days(days: i64) -> Date {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date { year, month, day }
    }

    /// Days since 1970-01-01.
    pub fn days(self) -> i64 {
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// `template` with this date's placeholders filled in.
    pub fn fill(self, template: &str) -> String {
        template
            .replace(
                "{YYYYMMDD}",
                &format!("{:04}{:02}{:02}", self.year, self.month, self.day),
            )
            .replace("{YYYY}", &format!("{:04}", self.year))
            .replace("{MM}", &format!("{:02}", self.month))
            .replace("{DD}", &format!("{:02}", self.day))
    }
}

/// Whether a topic entry is a date template.
pub fn is_template(entry: &str) -> bool {
    PLACEHOLDERS.iter().any(|p| entry.contains(p))
}

/// The configured topics, and the clock that dates the templates.
#[derive(Clone)]
pub struct Subscription {
    entries: Vec<String>,
    previous_nights: u32,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("entries", &self.entries)
            .field("previous_nights", &self.previous_nights)
            .finish_non_exhaustive()
    }
}

/// A topic name as a regular expression that matches only itself.
fn literal(name: &str) -> String {
    name.replace('.', "\\.")
}

impl Subscription {
    pub fn new(entries: Vec<String>, previous_nights: u32, clock: Arc<dyn Clock>) -> Self {
        Subscription {
            entries,
            previous_nights,
            clock,
        }
    }

    /// Whether any entry is a date template.
    pub fn has_templates(&self) -> bool {
        self.entries.iter().any(|e| is_template(e))
    }

    /// The plain topic names (neither regular expressions nor templates):
    /// these must exist at start-up.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .map(String::as_str)
            .filter(|e| !e.starts_with('^') && !is_template(e))
    }

    /// Tonight's topics and the previous nights' for every template, newest
    /// first.
    pub fn nightly_topics(&self) -> Vec<String> {
        let today = Date::of(self.clock.now()).days();
        let mut out = Vec::new();
        for template in self.entries.iter().filter(|e| is_template(e)) {
            for back in 0..=i64::from(self.previous_nights) {
                out.push(Date::from_days(today - back).fill(template));
            }
        }
        out
    }

    /// What to pass to `subscribe` now: names and regular expressions as
    /// they are, the templates as one regular expression of tonight's (and
    /// the previous nights') topics.
    pub fn patterns(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !is_template(e))
            .cloned()
            .collect();
        let nightly = self.nightly_topics();
        if !nightly.is_empty() {
            let alternatives: Vec<String> = nightly.iter().map(|n| literal(n)).collect();
            out.push(format!("^({})$", alternatives.join("|")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    struct FakeClock(Mutex<SystemTime>);

    impl Clock for FakeClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    fn at(days: i64, secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400 + secs)
    }

    #[test]
    fn dates_round_trip_through_days_across_leap_years_and_centuries() {
        assert_eq!(
            Date::from_days(0),
            Date {
                year: 1970,
                month: 1,
                day: 1
            }
        );
        let d = Date {
            year: 2026,
            month: 11,
            day: 25,
        };
        assert_eq!(Date::from_days(d.days()), d);
        assert_eq!(
            Date::from_days(
                Date {
                    year: 2028,
                    month: 2,
                    day: 28
                }
                .days()
                    + 1
            )
            .day,
            29
        );
        assert_eq!(
            Date::from_days(
                Date {
                    year: 2100,
                    month: 2,
                    day: 28
                }
                .days()
                    + 1
            ),
            Date {
                year: 2100,
                month: 3,
                day: 1
            }
        );
        for days in (-1_000..100_000).step_by(7) {
            assert_eq!(Date::from_days(days).days(), days);
        }
    }

    #[test]
    fn a_template_becomes_tonights_topic_and_the_previous_nights() {
        let today = Date {
            year: 2026,
            month: 3,
            day: 1,
        }
        .days();
        let clock = Arc::new(FakeClock(Mutex::new(at(today, 3_600))));
        let s = Subscription::new(
            vec![
                "ztf_{YYYYMMDD}_programid1".into(),
                "^lsst-alerts-.*".into(),
                "plain".into(),
            ],
            2,
            clock,
        );
        assert_eq!(
            s.nightly_topics(),
            vec![
                "ztf_20260301_programid1",
                "ztf_20260228_programid1",
                "ztf_20260227_programid1"
            ]
        );
        assert_eq!(
            s.patterns(),
            vec![
                "^lsst-alerts-.*",
                "plain",
                "^(ztf_20260301_programid1|ztf_20260228_programid1|ztf_20260227_programid1)$"
            ]
        );
        assert_eq!(s.names().collect::<Vec<_>>(), vec!["plain"]);
    }

    #[test]
    fn the_subscription_rolls_over_at_midnight_utc() {
        let day = Date {
            year: 2026,
            month: 12,
            day: 31,
        }
        .days();
        let clock = Arc::new(FakeClock(Mutex::new(at(day, 86_399))));
        let s = Subscription::new(
            vec!["ztf_{YYYY}-{MM}-{DD}_programid3".into()],
            0,
            clock.clone(),
        );
        let before = s.patterns();
        assert_eq!(before, vec!["^(ztf_2026-12-31_programid3)$"]);
        *clock.0.lock().unwrap() = at(day + 1, 1);
        assert_eq!(s.patterns(), vec!["^(ztf_2027-01-01_programid3)$"]);
        assert_ne!(before, s.patterns());
    }

    #[test]
    fn dots_in_a_template_match_only_dots() {
        let clock = Arc::new(FakeClock(Mutex::new(at(0, 0))));
        let s = Subscription::new(vec!["a.{YYYYMMDD}".into()], 0, clock);
        assert_eq!(s.patterns(), vec!["^(a\\.19700101)$"]);
    }
}
