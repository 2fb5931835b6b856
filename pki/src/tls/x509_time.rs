//! Conversions between `SystemTime` and the times certificates hold (whole
//! seconds, which may lie before 1970 or far ahead).

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

/// A time as certificates hold it; None if it cannot be one.
pub fn to_x509(time: SystemTime) -> Option<OffsetDateTime> {
    let seconds = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs()).ok().map(|s| -s),
    };
    seconds.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
}

/// A certificate's time (seconds from the epoch); None if `SystemTime`
/// cannot hold it.
pub fn from_x509(unix_seconds: i64) -> Option<SystemTime> {
    let offset = Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_whole_seconds_both_sides_of_1970() {
        for seconds in [-86_400_i64, 0, 1_795_000_000] {
            let time = from_x509(seconds).unwrap();
            assert_eq!(to_x509(time).unwrap().unix_timestamp(), seconds);
        }
    }
}
