//! lyft/discovery's `auto_ip` on `POST /v1/registration/{service}`: a check-in that names no
//! `ip` but sets `auto_ip` is stored under the caller's own address. The caller is the peer
//! of the connection, or — behind `trusted_proxies` proxies — the hop of `X-Forwarded-For`
//! that the outermost trusted proxy appended (the last hop for one proxy, as lyft's ProxyFix
//! did). Hops further left were written by the client and cannot be trusted.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use schema::api::V1Form;
use serde_json::Value;

use crate::errors::ApiError;

/// The connection's peer address, when the router is served with connect info (as
/// [`crate::serve`] does); `None` when it is driven some other way.
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        Ok(PeerAddr(peer))
    }
}

/// The caller's address: the peer with `trusted_proxies == 0`, else the `trusted_proxies`-th
/// `X-Forwarded-For` hop from the end (every header line counts, in order).
pub fn caller_ip(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    trusted_proxies: usize,
) -> Result<IpAddr, ApiError> {
    if trusted_proxies == 0 {
        return peer.map(|p| p.ip().to_canonical()).ok_or_else(|| {
            ApiError::BadRequest("auto_ip: the connection's peer address is unknown".into())
        });
    }
    let mut hops = Vec::new();
    for line in headers.get_all("x-forwarded-for") {
        let line = line.to_str().map_err(|_| {
            ApiError::BadRequest("auto_ip: X-Forwarded-For is not ASCII text".into())
        })?;
        hops.extend(line.split(',').map(str::trim));
    }
    let Some(hop) = hops.len().checked_sub(trusted_proxies).map(|i| hops[i]) else {
        return Err(ApiError::BadRequest(format!(
            "auto_ip: X-Forwarded-For has {} hop(s), but the registry trusts {trusted_proxies} \
             proxy(ies) in front of it",
            hops.len()
        )));
    };
    parse_hop(hop).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "auto_ip: X-Forwarded-For hop {hop:?} is not an IP address"
        ))
    })
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, or with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:5678`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

/// lyft's clients send `auto_ip=true`; accept the usual spellings of a flag.
fn flag(value: &str) -> Result<bool, ApiError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        other => Err(ApiError::BadRequest(format!(
            "auto_ip must be true or false, got {other:?}"
        ))),
    }
}

/// A JSON v1 check-in body with `auto_ip` resolved: the field removed and, when it is set
/// and the body names no `ip`, the caller's address (from `caller`, asked only then) put in
/// its place. An explicit `ip` wins, as in lyft. A body without `auto_ip`, or one that does
/// not parse (the check-in parser reports that), comes back unchanged.
pub fn resolve_auto_ip_json<'a>(
    body: &'a [u8],
    caller: impl FnOnce() -> Result<IpAddr, ApiError>,
) -> Result<Cow<'a, [u8]>, ApiError> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return Ok(Cow::Borrowed(body));
    };
    let Some(auto) = obj.remove("auto_ip") else {
        return Ok(Cow::Borrowed(body));
    };
    let on = match &auto {
        Value::Bool(b) => *b,
        Value::String(s) => flag(s)?,
        Value::Number(n) => flag(&n.to_string())?,
        Value::Null => false,
        other => {
            return Err(ApiError::BadRequest(format!(
                "auto_ip must be true or false, got {other}"
            )));
        }
    };
    let named = match obj.get("ip") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(_) => true,
    };
    if on && !named {
        obj.insert("ip".into(), Value::String(caller()?.to_string()));
    }
    let bytes = serde_json::to_vec(&obj)
        .map_err(|e| ApiError::BadRequest(format!("cannot re-encode the body: {e}")))?;
    Ok(Cow::Owned(bytes))
}

/// A decoded v1 check-in form with `auto_ip` resolved: when its last `auto_ip` is set (every
/// one must be a flag) and the form names no `ip` (or a blank one), `ip` becomes the
/// caller's address, from `caller`, asked only then. An explicit `ip` wins, as in lyft.
pub fn resolve_auto_ip_form(
    form: &mut V1Form<'_>,
    caller: impl FnOnce() -> Result<IpAddr, ApiError>,
) -> Result<(), ApiError> {
    let mut on = false;
    for v in &form.auto_ip {
        on = flag(v)?;
    }
    let named = form.ip.as_deref().is_some_and(|ip| !ip.trim().is_empty());
    if on && !named {
        form.ip = Some(Cow::Owned(caller()?.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(l).expect("header"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_peer_without_trusted_proxies_and_the_nth_hop_from_the_end_with_them() {
        let peer: SocketAddr = "[::ffff:192.168.1.9]:5000".parse().expect("addr");
        let h = xff(&["6.6.6.6, 10.1.1.1", "10.2.2.2"]);
        assert_eq!(
            caller_ip(&h, Some(peer), 0).expect("peer"),
            ip("192.168.1.9")
        );
        assert_eq!(caller_ip(&h, Some(peer), 1).expect("1"), ip("10.2.2.2"));
        assert_eq!(caller_ip(&h, Some(peer), 2).expect("2"), ip("10.1.1.1"));
        assert_eq!(caller_ip(&h, None, 3).expect("3"), ip("6.6.6.6"));
        assert!(caller_ip(&h, Some(peer), 4).is_err(), "too few hops");
        assert!(caller_ip(&HeaderMap::new(), Some(peer), 1).is_err());
        assert!(caller_ip(&HeaderMap::new(), None, 0).is_err());
        assert!(caller_ip(&xff(&["1.2.3.4, bogus"]), None, 1).is_err());
        assert!(
            caller_ip(&xff(&["1.2.3.4,"]), None, 1).is_err(),
            "empty hop"
        );
        assert_eq!(
            caller_ip(&xff(&["[2001:db8::1]:443"]), None, 1).expect("v6"),
            ip("2001:db8::1")
        );
        assert_eq!(
            caller_ip(&xff(&["10.0.0.1:9"]), None, 1).expect("port"),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn auto_ip_fills_in_a_missing_ip_and_an_explicit_one_wins() {
        let me = || Ok(ip("10.9.9.9"));
        let form = |body: &'static [u8]| -> Result<V1Form<'static>, ApiError> {
            let mut f = V1Form::decode(body);
            resolve_auto_ip_form(&mut f, me)?;
            Ok(f)
        };
        let ip_of = |f: V1Form<'_>| f.ip.map(Cow::into_owned);
        assert_eq!(
            ip_of(form(b"auto_ip=true&port=80").expect("form")).as_deref(),
            Some("10.9.9.9")
        );
        let out = form(b"auto_ip=true&ip=&port=80").expect("empty ip");
        assert_eq!(ip_of(out).as_deref(), Some("10.9.9.9"));
        let out = form(b"auto_ip=true&ip=10.0.0.1&port=80").expect("ip");
        assert_eq!(ip_of(out).as_deref(), Some("10.0.0.1"));
        assert_eq!(ip_of(form(b"auto_ip=false&port=80").expect("off")), None);
        // The last flag counts, and every one must be a flag.
        assert_eq!(
            ip_of(form(b"auto_ip=1&auto_ip=off&port=80").expect("last")),
            None
        );
        assert!(form(b"auto_ip=maybe&auto_ip=true&port=80").is_err());
        assert!(form(b"auto_ip=maybe&port=80").is_err());
        let unknown = || Err(ApiError::BadRequest("no".into()));
        let mut same = V1Form::decode(b"ip=10.0.0.1&port=80");
        resolve_auto_ip_form(&mut same, unknown).expect("caller not asked");
        assert_eq!(same, V1Form::decode(b"ip=10.0.0.1&port=80"));
        let mut off = V1Form::decode(b"auto_ip=true&ip=10.0.0.1");
        resolve_auto_ip_form(&mut off, unknown).expect("named: caller not asked");
        let mut unknown_peer = V1Form::decode(b"auto_ip=true&port=80");
        assert!(resolve_auto_ip_form(&mut unknown_peer, unknown).is_err());

        let out = resolve_auto_ip_json(br#"{"auto_ip":true,"port":80}"#, me).expect("json");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v, serde_json::json!({"ip": "10.9.9.9", "port": 80}));
        let out = resolve_auto_ip_json(br#"{"auto_ip":"true","ip":"10.0.0.1","port":80}"#, me)
            .expect("json ip");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v, serde_json::json!({"ip": "10.0.0.1", "port": 80}));
        assert!(resolve_auto_ip_json(br#"{"auto_ip":[1],"port":80}"#, me).is_err());
        assert!(resolve_auto_ip_json(br#"{"auto_ip":true,"port":80}"#, unknown).is_err());
        let same = resolve_auto_ip_json(br#"{"ip":"10.0.0.1","port":80}"#, unknown).expect("as is");
        assert!(matches!(same, Cow::Borrowed(_)));
    }
}
