//! The one duration grammar of every config file, flag and query parameter: a humane string
//! (`"250ms"`, `"30s"`, `"5m"`, `"1h 30m"`) or a bare number of seconds (`180`, `"180"`).
//! Use it as `#[serde(with = "schema::duration")]` (or `schema::duration::option` for an
//! `Option<Duration>`), and [`parse`] for flags.

use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Parses a duration in the grammar above.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid duration {s:?}: {e} (e.g. \"250ms\", \"30s\", \"5m\", or seconds)")
    })
}

/// Formats a duration so that [`parse`] reads it back (`"1m 30s"`, `"250ms"`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration such as \"30s\" or \"5m\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom("a duration cannot be negative"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(v).map_err(E::custom)
    }
}

/// The same grammar for an optional duration (absent: `None`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_for_strings_and_bare_seconds() {
        assert_eq!(parse("180"), Ok(Duration::from_secs(180)));
        assert_eq!(parse(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse("soon").is_err());
        assert!(parse("-5").is_err());
        for d in [
            Duration::from_millis(250),
            Duration::from_secs(90),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{d:?} round-trips");
        }
    }

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Cfg {
        #[serde(with = "super")]
        ttl: Duration,
        #[serde(with = "super::option", default)]
        wait: Option<Duration>,
    }

    #[test]
    fn configs_take_numbers_and_strings_alike() {
        let a: Cfg = serde_json::from_str(r#"{"ttl": 180}"#).expect("number");
        let b: Cfg = serde_json::from_str(r#"{"ttl": "3m", "wait": "5s"}"#).expect("string");
        assert_eq!(a.ttl, b.ttl);
        assert_eq!(b.wait, Some(Duration::from_secs(5)));
        assert!(serde_json::from_str::<Cfg>(r#"{"ttl": -1}"#).is_err());
        let back: Cfg = serde_json::from_str(&serde_json::to_string(&b).expect("ser")).expect("de");
        assert_eq!(back, b);
    }
}
