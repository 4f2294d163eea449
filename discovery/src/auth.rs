//! Write authorisation (DESIGN.md §4.4). With a secret configured, every write carries
//! `Authorization: Bearer <token>`:
//! - a **host token**, `hex(HMAC-SHA256(secret, ip))` with `ip` in its canonical text form
//!   (`10.0.0.7`, `2001:db8::1`), may write only endpoints on that ip;
//! - the **operator token**, `hex(HMAC-SHA256(secret, "operator"))`, may write anything
//!   (including service-wide weights).
//!
//! Tokens are stateless, so every registry replica with the same secret accepts them, and
//! an operator can mint a host's token offline. Comparison is constant-time (`verify_slice`).

use std::net::IpAddr;

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::errors::ApiError;

type HmacSha256 = Hmac<Sha256>;

const OPERATOR: &[u8] = b"operator";

fn mac(secret: &[u8], msg: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(msg);
    m
}

/// The token that lets the host at `ip` write its own endpoints.
pub fn host_token(secret: &str, ip: IpAddr) -> String {
    hex::encode(
        mac(secret.as_bytes(), ip.to_string().as_bytes())
            .finalize()
            .into_bytes(),
    )
}

/// The token that may write anything.
pub fn operator_token(secret: &str) -> String {
    hex::encode(mac(secret.as_bytes(), OPERATOR).finalize().into_bytes())
}

/// What a write needs to be allowed.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Writes endpoints on exactly these ips (a host token for each, or the operator).
    Ips(&'a [IpAddr]),
    /// Writes across hosts (a service-wide weight): the operator only.
    Operator,
}

/// Checks bearer tokens against the registry's secret. Without a secret, everything passes.
#[derive(Clone)]
pub struct Auth {
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.secret.is_some())
            .finish()
    }
}

impl Auth {
    pub fn new(secret: Option<&str>) -> Self {
        Auth {
            secret: secret.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Reads the bearer token (401 when missing or garbled). Done before the body is parsed,
    /// so an anonymous write is refused whatever it carries.
    pub fn grant(&self, headers: &HeaderMap) -> Result<Grant, ApiError> {
        let Some(secret) = &self.secret else {
            return Ok(Grant::Any);
        };
        let token = bearer(headers)?;
        if mac(secret, OPERATOR).verify_slice(&token).is_ok() {
            return Ok(Grant::Any);
        }
        Ok(Grant::Token(token))
    }

    /// Whether `grant` covers `scope` (403 otherwise).
    pub fn authorize(&self, grant: &Grant, scope: Scope<'_>) -> Result<(), ApiError> {
        let (Some(secret), Grant::Token(token)) = (&self.secret, grant) else {
            return Ok(());
        };
        match scope {
            Scope::Operator => Err(ApiError::Forbidden(
                "this write needs the operator token".into(),
            )),
            Scope::Ips(ips) => {
                for ip in ips {
                    if mac(secret, ip.to_string().as_bytes())
                        .verify_slice(token)
                        .is_err()
                    {
                        return Err(ApiError::Forbidden(format!(
                            "the token does not allow writes on {ip}"
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    pub fn check(&self, headers: &HeaderMap, scope: Scope<'_>) -> Result<(), ApiError> {
        let grant = self.grant(headers)?;
        self.authorize(&grant, scope)
    }
}

/// What a request's token allows: everything (no secret, or the operator token), or the
/// ips whose host token it is.
#[derive(Debug, Clone)]
pub enum Grant {
    Any,
    Token(Vec<u8>),
}

/// The raw token bytes of `Authorization: Bearer <hex>`; anything else is a 401.
fn bearer(headers: &HeaderMap) -> Result<Vec<u8>, ApiError> {
    let unauthorized = |m: &str| ApiError::Unauthorized(m.to_string());
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| unauthorized("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized("expected `Bearer <token>`"));
    }
    let bytes = hex::decode(token.trim()).map_err(|_| unauthorized("the token is not hex"))?;
    if bytes.len() != 32 {
        return Err(unauthorized("the token has the wrong length"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[test]
    fn host_tokens_are_bound_to_their_ip() {
        let auth = Auth::new(Some("s3cret"));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "2001:db8::1".parse().expect("ip");
        let h = headers(&host_token("s3cret", a));
        assert!(auth.check(&h, Scope::Ips(&[a])).is_ok());
        assert!(matches!(
            auth.check(&h, Scope::Ips(&[a, b])),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            auth.check(&h, Scope::Operator),
            Err(ApiError::Forbidden(_))
        ));
        let op = headers(&operator_token("s3cret"));
        assert!(auth.check(&op, Scope::Ips(&[a, b])).is_ok());
        assert!(auth.check(&op, Scope::Operator).is_ok());
        let other = headers(&operator_token("other"));
        assert!(matches!(
            auth.check(&other, Scope::Ips(&[a])),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn missing_or_garbled_tokens_are_401() {
        let auth = Auth::new(Some("s3cret"));
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for h in [HeaderMap::new(), headers("zz"), headers("abcd"), {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
            h
        }] {
            assert!(matches!(
                auth.check(&h, Scope::Ips(&[ip])),
                Err(ApiError::Unauthorized(_))
            ));
        }
        assert!(
            Auth::new(None)
                .check(&HeaderMap::new(), Scope::Operator)
                .is_ok()
        );
    }
}
