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

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

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
