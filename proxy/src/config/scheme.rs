//! How the proxy talks to a peer, as a type: a URL's scheme is parsed once, and an unknown
//! one is refused with its name rather than taken for plain HTTP.

use std::fmt;

/// Plain HTTP, or HTTP over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// A URL whose scheme is neither `http` nor `https`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheme in {0:?}: expected http:// or https://")]
pub struct UnknownScheme(pub String);

impl Scheme {
    /// The scheme of `url` (`http://…` or `https://…`, in any case, as URI schemes are).
    pub fn of_url(url: &str) -> Result<Scheme, UnknownScheme> {
        match url.split_once("://") {
            Some((s, _)) if s.eq_ignore_ascii_case("http") => Ok(Scheme::Http),
            Some((s, _)) if s.eq_ignore_ascii_case("https") => Ok(Scheme::Https),
            _ => Err(UnknownScheme(url.to_string())),
        }
    }

    /// Over TLS when `tls` is set.
    pub fn tls(tls: bool) -> Scheme {
        if tls { Scheme::Https } else { Scheme::Http }
    }

    pub fn is_tls(self) -> bool {
        self == Scheme::Https
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The `http` crate's form, for absolute request targets.
    pub fn to_http(self) -> http::uri::Scheme {
        match self {
            Scheme::Http => http::uri::Scheme::HTTP,
            Scheme::Https => http::uri::Scheme::HTTPS,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse_once_and_unknown_ones_are_named() {
        assert_eq!(Scheme::of_url("http://a:1"), Ok(Scheme::Http));
        assert_eq!(Scheme::of_url("HTTPS://a:1"), Ok(Scheme::Https));
        let err = Scheme::of_url("ftp://a").expect_err("ftp is refused");
        assert!(err.to_string().contains("ftp://a"), "{err}");
        assert!(Scheme::of_url("a:1").is_err());
        assert_eq!(Scheme::tls(true).to_http(), http::uri::Scheme::HTTPS);
    }
}
