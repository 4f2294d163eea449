//! Write authorisation. Without a secret the registry's writes are **open**: anyone who
//! can reach it may register or deregister anything (it says so at start and in
//! `GET /v1/ops/status`). With a secret, every write carries `Authorization: Bearer <token>`:
//! - a **host token**, `hex(HMAC-SHA256(secret, ip))` with `ip` in its canonical text form
//!   (`10.0.0.7`, `2001:db8::1`), may write only endpoints on that ip;
//! - a **scoped host token**, `web,api:hex(HMAC-SHA256(secret, "10.0.0.7 services=api,web"))`,
//!   may write only endpoints of the services it names on that ip. The services travel in
//!   the clear (the registry needs them to rebuild the signed string) and are signed sorted
//!   and de-duplicated, so their order in the token does not matter. The signed string can
//!   never equal a bare ip or `operator`, so no token of one kind passes as another;
//! - the **operator token**, `hex(HMAC-SHA256(secret, "operator"))`, may write anything
//!   (including service-wide weights).
//!
//! A host token must name what it writes: a write that names no endpoint (a v2 check-in with
//! no endpoints) is refused, since otherwise any well-formed token would pass unchecked.
//! Tokens are stateless, so every registry replica with the same secret accepts them, and
//! an operator can mint a host's token offline. Comparison is constant-time (`verify_slice`).

use std::net::IpAddr;

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use schema::ServiceName;
use sha2::Sha256;

use crate::errors::ApiError;

type HmacSha256 = Hmac<Sha256>;

const OPERATOR: &[u8] = b"operator";

/// Most services one scoped token may name (keeps the header short).
pub const MAX_TOKEN_SERVICES: usize = 32;

fn mac(secret: &[u8], msg: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(msg);
    m
}

/// What a token signs: the bare ip, or the ip and its (sorted, unique) services.
fn signed_string(ip: IpAddr, services: Option<&[ServiceName]>) -> String {
    match services {
        None => ip.to_string(),
        Some(s) => {
            let names: Vec<&str> = s.iter().map(ServiceName::as_str).collect();
            format!("{ip} services={}", names.join(","))
        }
    }
}

fn canonical(services: &[ServiceName]) -> Vec<ServiceName> {
    let mut s = services.to_vec();
    s.sort();
    s.dedup();
    s
}

/// The token that lets the host at `ip` write its own endpoints.
pub fn host_token(secret: &str, ip: IpAddr) -> String {
    hex::encode(
        mac(secret.as_bytes(), signed_string(ip, None).as_bytes())
            .finalize()
            .into_bytes(),
    )
}

/// The token that lets the host at `ip` write its endpoints of `services` only. With no
/// services it is the plain [`host_token`].
pub fn scoped_token(secret: &str, ip: IpAddr, services: &[ServiceName]) -> String {
    if services.is_empty() {
        return host_token(secret, ip);
    }
    let services = canonical(services);
    let sig = mac(
        secret.as_bytes(),
        signed_string(ip, Some(&services)).as_bytes(),
    )
    .finalize()
    .into_bytes();
    let names: Vec<&str> = services.iter().map(ServiceName::as_str).collect();
    format!("{}:{}", names.join(","), hex::encode(sig))
}

/// The token that may write anything.
pub fn operator_token(secret: &str) -> String {
    hex::encode(mac(secret.as_bytes(), OPERATOR).finalize().into_bytes())
}

/// What a write needs to be allowed.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Writes endpoints of `services` on `ips` (a host token for each ip, scoped to cover
    /// the services if it is scoped, or the operator). Empty `ips`: nothing a host token
    /// could vouch for, so only the operator.
    Hosts {
        ips: &'a [IpAddr],
        services: &'a [&'a ServiceName],
    },
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

    /// `"open"` without a secret (anyone may write anything), `"tokens"` with one.
    pub fn mode(&self) -> &'static str {
        if self.secret.is_some() {
            "tokens"
        } else {
            "open"
        }
    }

    /// Reads the bearer token (401 when missing or garbled). Done before the body is parsed,
    /// so an anonymous write is refused whatever it carries.
    pub fn grant(&self, headers: &HeaderMap) -> Result<Grant, ApiError> {
        let Some(secret) = &self.secret else {
            return Ok(Grant::Any);
        };
        let token = bearer(headers)?;
        if token.services.is_none() && mac(secret, OPERATOR).verify_slice(&token.sig).is_ok() {
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
            Scope::Hosts { ips: [], .. } => Err(ApiError::Forbidden(
                "a host token must name the endpoints it writes; this write names none".into(),
            )),
            Scope::Hosts { ips, services } => {
                for ip in ips {
                    let signed = signed_string(*ip, token.services.as_deref());
                    if mac(secret, signed.as_bytes())
                        .verify_slice(&token.sig)
                        .is_err()
                    {
                        return Err(ApiError::Forbidden(format!(
                            "the token does not allow writes on {ip}"
                        )));
                    }
                }
                if let Some(allowed) = &token.services {
                    if let Some(s) = services.iter().find(|s| !allowed.contains(s)) {
                        return Err(ApiError::Forbidden(format!(
                            "the token does not allow writes to service {s}"
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

/// A presented token: its signature and, if scoped, the services it names (canonical).
#[derive(Debug, Clone)]
pub struct Token {
    services: Option<Vec<ServiceName>>,
    sig: Vec<u8>,
}

/// What a request's token allows: everything (no secret, or the operator token), or what
/// its host token covers.
#[derive(Debug, Clone)]
pub enum Grant {
    Any,
    Token(Token),
}

impl Grant {
    /// The services a service-scoped host token is limited to; `None` for any service.
    pub fn services(&self) -> Option<&[ServiceName]> {
        match self {
            Grant::Any => None,
            Grant::Token(t) => t.services.as_deref(),
        }
    }
}

/// The token of `Authorization: Bearer [services:]<hex>`; anything else is a 401.
fn bearer(headers: &HeaderMap) -> Result<Token, ApiError> {
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
    let (services, sig) = match token.trim().split_once(':') {
        None => (None, token.trim()),
        Some((names, sig)) => {
            let names: Vec<&str> = names.split(',').collect();
            if names.len() > MAX_TOKEN_SERVICES {
                return Err(unauthorized("the token names too many services"));
            }
            let services = names
                .into_iter()
                .map(ServiceName::new)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| unauthorized("the token names an invalid service"))?;
            (Some(canonical(&services)), sig)
        }
    };
    let sig = hex::decode(sig).map_err(|_| unauthorized("the token is not hex"))?;
    if sig.len() != 32 {
        return Err(unauthorized("the token has the wrong length"));
    }
    Ok(Token { services, sig })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn scope<'a>(ips: &'a [IpAddr], services: &'a [&'a ServiceName]) -> Scope<'a> {
        Scope::Hosts { ips, services }
    }

    fn hosts(ips: &[IpAddr]) -> Scope<'_> {
        Scope::Hosts { ips, services: &[] }
    }

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
        assert!(auth.check(&h, hosts(&[a])).is_ok());
        assert!(matches!(
            auth.check(&h, hosts(&[a, b])),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            auth.check(&h, Scope::Operator),
            Err(ApiError::Forbidden(_))
        ));
        let op = headers(&operator_token("s3cret"));
        assert!(auth.check(&op, hosts(&[a, b])).is_ok());
        assert!(auth.check(&op, Scope::Operator).is_ok());
        let other = headers(&operator_token("other"));
        assert!(matches!(
            auth.check(&other, hosts(&[a])),
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
                auth.check(&h, hosts(&[ip])),
                Err(ApiError::Unauthorized(_))
            ));
        }
        assert!(
            Auth::new(None)
                .check(&HeaderMap::new(), Scope::Operator)
                .is_ok()
        );
    }

    #[test]
    fn scoped_tokens_cover_only_their_services_on_their_ip() {
        let auth = Auth::new(Some("s3cret"));
        let ip: IpAddr = "10.0.0.7".parse().expect("ip");
        let other: IpAddr = "10.0.0.8".parse().expect("ip");
        let name = |s: &str| ServiceName::new(s).expect("name");
        let (web, api, db) = (name("web"), name("api"), name("db"));
        let token = scoped_token("s3cret", ip, &[web.clone(), api.clone(), web.clone()]);
        assert!(token.starts_with("api,web:"), "{token}");
        // The order the services are listed in does not matter.
        let (names, sig) = token.split_once(':').expect("scoped");
        assert_eq!(names, "api,web");
        let h = headers(&format!("web,api:{sig}"));
        assert!(auth.check(&h, scope(&[ip], &[&web, &api])).is_ok());
        for bad in [scope(&[ip], &[&web, &db]), scope(&[other], &[&web])] {
            assert!(matches!(auth.check(&h, bad), Err(ApiError::Forbidden(_))));
        }
        // Dropping or adding a service breaks the signature.
        for forged in [format!("web:{sig}"), format!("api,db,web:{sig}")] {
            assert!(matches!(
                auth.check(&headers(&forged), scope(&[ip], &[&web])),
                Err(ApiError::Forbidden(_))
            ));
        }
        // A plain host token's signature does not pass as a scoped one, nor the reverse.
        let plain = host_token("s3cret", ip);
        assert!(matches!(
            auth.check(&headers(&format!("web:{plain}")), scope(&[ip], &[&web])),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            auth.check(&headers(sig), scope(&[ip], &[&web])),
            Err(ApiError::Forbidden(_))
        ));
        // Garbled service lists are 401 like any garbled token.
        for garbled in [
            format!("Web:{sig}"),
            format!(":{sig}"),
            format!("web,,api:{sig}"),
        ] {
            assert!(matches!(
                auth.check(&headers(&garbled), scope(&[ip], &[&web])),
                Err(ApiError::Unauthorized(_))
            ));
        }
        assert_eq!(scoped_token("s3cret", ip, &[]), plain);
    }

    #[test]
    fn a_host_token_that_names_no_endpoint_is_refused() {
        let auth = Auth::new(Some("s3cret"));
        let ip: IpAddr = "10.0.0.7".parse().expect("ip");
        let h = headers(&host_token("s3cret", ip));
        assert!(matches!(
            auth.check(&h, hosts(&[])),
            Err(ApiError::Forbidden(_))
        ));
        let op = headers(&operator_token("s3cret"));
        assert!(auth.check(&op, hosts(&[])).is_ok());
        assert_eq!(auth.mode(), "tokens");
        assert_eq!(Auth::new(None).mode(), "open");
    }
}
