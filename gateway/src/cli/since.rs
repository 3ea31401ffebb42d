//! The one `--since` parser of the review commands (`findings list`,
//! `sessions list`).
//!
//! Accepted, tried in this order:
//! - an RFC 3339 time: `2024-05-01T10:00:00Z`, `2024-05-01T10:00:00+02:00`;
//! - a date, meaning its midnight in UTC: `2024-05-01`;
//! - an age before now, in `humantime` units: `30s`, `30m`, `24h`, `7d`,
//!   `2w`, combined as `1h 30m` (also `min`, `hours`, `days`, ... and
//!   `M`/`y` for months and years of 30.44 and 365.25 days).

use time::{format_description::well_known::Rfc3339, macros::format_description, OffsetDateTime};

/// Parses a `--since` value relative to the current time (a clap value parser).
pub fn parse_since(s: &str) -> Result<OffsetDateTime, String> {
    parse_since_at(s, OffsetDateTime::now_utc())
}

/// [`parse_since`] with `now` as the current time.
pub fn parse_since_at(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    if let Ok(d) = time::Date::parse(s, format_description!("[year]-[month]-[day]")) {
        return Ok(d.midnight().assume_utc());
    }
    let age = humantime::parse_duration(s)
        .map_err(|_| format!("`{s}` is not a time (RFC 3339, YYYY-MM-DD, or an age like 30m, 24h, 7d, 1h 30m)"))?;
    time::Duration::try_from(age)
        .ok()
        .and_then(|age| now.checked_sub(age))
        .ok_or_else(|| format!("`{s}`: too long ago"))
}

/// An `--expires` value: a time, or `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Until revoked.
    Never,
    /// At this instant.
    At(OffsetDateTime),
}

impl Expiry {
    /// The instant, `None` for never.
    pub fn at(self) -> Option<OffsetDateTime> {
        match self {
            Expiry::Never => None,
            Expiry::At(t) => Some(t),
        }
    }
}

/// Parses an `--expires` value (a clap value parser): `never`, an RFC 3339
/// time, a date (its midnight, UTC) or a duration from now (`90s`, `8h`,
/// `30d`, `1h 30m`).
pub fn parse_expiry(s: &str) -> Result<Expiry, String> {
    parse_expiry_at(s, OffsetDateTime::now_utc())
}

/// [`parse_expiry`] with `now` as the current time.
pub fn parse_expiry_at(s: &str, now: OffsetDateTime) -> Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry::Never);
    }
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(Expiry::At(t));
    }
    if let Ok(d) = time::Date::parse(s, format_description!("[year]-[month]-[day]")) {
        return Ok(Expiry::At(d.midnight().assume_utc()));
    }
    let after = humantime::parse_duration(s).map_err(|_| {
        format!("`{s}` is not an expiry (never, RFC 3339, YYYY-MM-DD, or a duration like 90s, 8h, 30d)")
    })?;
    time::Duration::try_from(after)
        .ok()
        .and_then(|after| now.checked_add(after))
        .map(Expiry::At)
        .ok_or_else(|| format!("`{s}`: too far ahead"))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn expiries_parse() {
        let now = datetime!(2024-05-10 12:00 UTC);
        assert_eq!(parse_expiry_at("never", now), Ok(Expiry::Never));
        assert_eq!(parse_expiry_at("90s", now), Ok(Expiry::At(datetime!(2024-05-10 12:01:30 UTC))));
        assert_eq!(parse_expiry_at("30d", now), Ok(Expiry::At(datetime!(2024-06-09 12:00 UTC))));
        assert_eq!(parse_expiry_at("2024-06-01", now), Ok(Expiry::At(datetime!(2024-06-01 0:00 UTC))));
        assert!(parse_expiry_at("soon", now).is_err());
    }

    #[test]
    fn every_documented_form_parses() {
        let now = datetime!(2024-05-10 12:00 UTC);
        // Ages.
        assert_eq!(parse_since_at("30s", now), Ok(datetime!(2024-05-10 11:59:30 UTC)));
        assert_eq!(parse_since_at("30m", now), Ok(datetime!(2024-05-10 11:30 UTC)));
        assert_eq!(parse_since_at("1h", now), Ok(datetime!(2024-05-10 11:00 UTC)));
        assert_eq!(parse_since_at("24h", now), Ok(datetime!(2024-05-09 12:00 UTC)));
        assert_eq!(parse_since_at("7d", now), Ok(datetime!(2024-05-03 12:00 UTC)));
        assert_eq!(parse_since_at("2w", now), Ok(datetime!(2024-04-26 12:00 UTC)));
        assert_eq!(parse_since_at("1h 30m", now), Ok(datetime!(2024-05-10 10:30 UTC)));
        assert_eq!(parse_since_at("0s", now), Ok(now));
        // A date: its midnight in UTC.
        assert_eq!(parse_since_at("2024-05-01", now), Ok(datetime!(2024-05-01 0:00 UTC)));
        // RFC 3339, any offset.
        assert_eq!(parse_since_at("2024-05-01T10:00:00+02:00", now), Ok(datetime!(2024-05-01 8:00 UTC)));
        assert_eq!(parse_since_at("2024-05-01T10:00:00Z", now), Ok(datetime!(2024-05-01 10:00 UTC)));
    }

    #[test]
    fn everything_else_is_refused_with_the_accepted_forms() {
        let now = datetime!(2024-05-10 12:00 UTC);
        for bad in ["", "yesterday", "h", "30", "-1h", "2024-13-01", "2024-05-01 10:00", "1x"] {
            let err = parse_since_at(bad, now).expect_err(bad);
            assert!(err.contains("RFC 3339") || err.contains("too long ago"), "{bad}: {err}");
        }
        // Further back than time can say.
        assert!(parse_since_at("100000000y", now).is_err());
    }
}
