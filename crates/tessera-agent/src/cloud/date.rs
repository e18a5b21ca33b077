//! Strict parsers for the two timestamp forms the metadata services use, to Unix milliseconds.
//! Both refuse anything outside 1970..=9999, impossible dates (Feb 30, hour 24) and leap seconds.

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// AWS's RFC 3339 form, exactly `YYYY-MM-DDTHH:MM:SSZ` (UTC, no fraction, no offset).
pub(super) fn parse_rfc3339_utc(s: &str) -> Result<u64, String> {
    let b = s.as_bytes();
    let shape_ok = s.is_ascii()
        && b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z';
    if !shape_ok {
        return Err(format!("'{}' is not of the form YYYY-MM-DDTHH:MM:SSZ", shown(s)));
    }
    let num = |from: usize, to: usize| digits(&s[from..to]).ok_or_else(|| format!("'{}' has a non-digit", shown(s)));
    unix_ms(num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?)
}

/// RFC 1123 (HTTP date) as Azure writes it: `Mon, 19 Sep 2016 18:29:47 GMT`. The day may have
/// one or two digits; the weekday must be a weekday name but is not checked against the date.
pub(super) fn parse_rfc1123(s: &str) -> Result<u64, String> {
    let bad = || format!("'{}' is not of the form 'Mon, 19 Sep 2016 18:29:47 GMT'", shown(s));
    if !s.is_ascii() {
        return Err(bad());
    }
    let parts: Vec<&str> = s.split(' ').collect();
    let [weekday, day, month, year, time, zone] = parts.as_slice() else { return Err(bad()) };
    let weekday_ok = weekday.strip_suffix(',').is_some_and(|w| WEEKDAYS.contains(&w));
    if !weekday_ok || *zone != "GMT" || day.is_empty() || day.len() > 2 || year.len() != 4 {
        return Err(bad());
    }
    let month = MONTHS.iter().position(|m| m == month).ok_or_else(bad)? as u64 + 1;
    let t = time.as_bytes();
    if t.len() != 8 || t[2] != b':' || t[5] != b':' {
        return Err(bad());
    }
    let num = |v: &str| digits(v).ok_or_else(bad);
    unix_ms(num(year)?, month, num(day)?, num(&time[0..2])?, num(&time[3..5])?, num(&time[6..8])?)
}

/// At most 64 characters of an untrusted value, for error messages.
fn shown(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_default).collect()
}

/// A run of ASCII digits (at most 4), as a number.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn unix_ms(y: u64, mo: u64, d: u64, h: u64, mi: u64, s: u64) -> Result<u64, String> {
    if !(1970..=9999).contains(&y) {
        return Err(format!("year {y} is outside 1970..=9999"));
    }
    if !(1..=12).contains(&mo) {
        return Err(format!("month {mo} is outside 1..=12"));
    }
    let month_days = match mo {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=month_days).contains(&d) {
        return Err(format!("day {d} does not exist in {y}-{mo:02}"));
    }
    if h > 23 || mi > 59 || s > 59 {
        return Err(format!("time {h:02}:{mi:02}:{s:02} does not exist"));
    }
    Ok((days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s) * 1_000)
}

/// Days since 1970-01-01 of a valid date in 1970..=9999 (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_utc("2026-11-26T12:34:56Z"), Ok(1_795_696_496_000));
        assert_eq!(parse_rfc3339_utc("2024-02-29T23:59:59Z"), Ok(1_709_251_199_000));
        assert_eq!(parse_rfc3339_utc("2000-03-01T00:00:00Z"), Ok(951_868_800_000));
    }

    #[test]
    fn rfc3339_refuses_everything_else() {
        for bad in [
            "",
            "2026-11-26T12:34:56",
            "2026-11-26T12:34:56.000Z",
            "2026-11-26T12:34:56+00:00",
            "2026-11-26 12:34:56Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T23:60:00Z",
            "2026-11-26T23:59:60Z",
            "1969-12-31T23:59:59Z",
            "2026-1a-26T12:34:56Z",
            "+026-11-26T12:34:56Z",
            "２０２６-11-26T12:34Z",
        ] {
            assert!(parse_rfc3339_utc(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn rfc1123_known_instants() {
        assert_eq!(parse_rfc1123("Mon, 19 Sep 2016 18:29:47 GMT"), Ok(1_474_309_787_000));
        assert_eq!(parse_rfc1123("Thu, 1 Jan 1970 00:00:00 GMT"), Ok(0));
        assert_eq!(parse_rfc1123("Thu, 29 Feb 2024 23:59:59 GMT"), Ok(1_709_251_199_000));
    }

    #[test]
    fn rfc1123_refuses_everything_else() {
        for bad in [
            "",
            "Mon, 19 Sep 2016 18:29:47",
            "Mon, 19 Sep 2016 18:29:47 UTC",
            "Mon 19 Sep 2016 18:29:47 GMT",
            "Mon,  19 Sep 2016 18:29:47 GMT",
            "Xyz, 19 Sep 2016 18:29:47 GMT",
            "Mon, 19 Sept 2016 18:29:47 GMT",
            "Mon, 31 Sep 2016 18:29:47 GMT",
            "Mon, 019 Sep 2016 18:29:47 GMT",
            "Mon, 19 Sep 16 18:29:47 GMT",
            "Mon, 19 Sep 2016 18:29 GMT",
            "Mon, 19 Sep 2016 18-29-47 GMT",
            "Mon, 19 Sep 2016 25:29:47 GMT",
            "2016-09-19T18:29:47Z",
        ] {
            assert!(parse_rfc1123(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
