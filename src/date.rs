//! IMF-fixdate (RFC 9110 §5.6.7) for the `Date` header of responses ringway makes itself.
//! Each worker formats it at most once a second, from its 50 ms sync task.

/// Length of "Sun, 06 Nov 1994 08:49:37 GMT".
pub const HTTP_DATE_LEN: usize = 29;

/// Formats seconds since the UNIX epoch as an IMF-fixdate.
pub fn http_date(secs: u64) -> [u8; HTTP_DATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    put2(&mut out[5..7], d as u64);
    out[8..11].copy_from_slice(MONTHS[(m - 1) as usize]);
    put2(&mut out[12..14], (y / 100) as u64);
    put2(&mut out[14..16], (y % 100) as u64);
    put2(&mut out[17..19], rem / 3600);
    put2(&mut out[20..22], rem / 60 % 60);
    put2(&mut out[23..25], rem % 60);
    out
}

/// Length of "2026-11-26T05:38:17.123Z".
pub const RFC3339_MILLIS_LEN: usize = 24;

/// Formats milliseconds since the UNIX epoch as RFC 3339 UTC with milliseconds
/// ("2026-11-26T05:38:17.123Z", RFC 3339 §5.6), for the access and event logs. No allocation.
pub fn rfc3339_millis(unix_ms: u64) -> [u8; RFC3339_MILLIS_LEN] {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = *b"1970-01-01T00:00:00.000Z";
    // Years past 9999 cannot be written in four digits: clamp (a clock that far off is wrong
    // anyway, and the line stays well-formed).
    let y = y.clamp(0, 9999) as u64;
    put2(&mut out[0..2], y / 100);
    put2(&mut out[2..4], y % 100);
    put2(&mut out[5..7], m as u64);
    put2(&mut out[8..10], d as u64);
    put2(&mut out[11..13], rem / 3600);
    put2(&mut out[14..16], rem / 60 % 60);
    put2(&mut out[17..19], rem % 60);
    let ms = unix_ms % 1000;
    out[20] = b'0' + (ms / 100) as u8;
    put2(&mut out[21..23], ms % 100);
    out
}

/// Milliseconds since the UNIX epoch now (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

fn put2(dst: &mut [u8], v: u64) {
    dst[0] = b'0' + (v / 10 % 10) as u8;
    dst[1] = b'0' + (v % 10) as u8;
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard Hinnant's
/// civil-from-days algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        for (t, want) in [
            (0u64, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_795_671_497, "Thu, 26 Nov 2026 05:38:17 GMT"),
            (4_102_444_800, "Fri, 01 Jan 2100 00:00:00 GMT"),
        ] {
            assert_eq!(std::str::from_utf8(&http_date(t)).unwrap(), want);
        }
    }

    #[test]
    fn rfc3339_with_milliseconds() {
        for (t, want) in [
            (0u64, "1970-01-01T00:00:00.000Z"),
            (951_782_400_007, "2000-02-29T00:00:00.007Z"),
            (1_795_671_497_123, "2026-11-26T05:38:17.123Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(std::str::from_utf8(&rfc3339_millis(t)).unwrap(), want);
        }
        // Far future: clamped, still well-formed.
        assert_eq!(rfc3339_millis(u64::MAX).len(), RFC3339_MILLIS_LEN);
    }
}
