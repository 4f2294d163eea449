//! One v1 check-in (`POST /v1/registration/{service}`), read once. lyft's clients send a form
//! with `tags` as a JSON string; others send a JSON [`EndpointSpec`]. Besides the endpoint,
//! the registry needs the keys of the tag object that was sent (the v1 tag merge replaces
//! only those) and, for forms, every `auto_ip` value: both come from the same decode, so a
//! renewal's body is decoded once and its tags parsed once.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::Value;

use super::EndpointSpec;
use crate::{Endpoint, ServiceName, ValidationError};

/// The fields of a v1 check-in form. As with any form decoder that fills a map, the last
/// occurrence of a field counts; `auto_ip` keeps every occurrence, in order, because each
/// one must be a valid flag. Other fields are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct V1Form<'a> {
    pub ip: Option<Cow<'a, str>>,
    pub port: Option<Cow<'a, str>>,
    pub revision: Option<Cow<'a, str>>,
    pub service_repo_name: Option<Cow<'a, str>>,
    pub tags: Option<Cow<'a, str>>,
    pub auto_ip: Vec<Cow<'a, str>>,
}

impl<'a> V1Form<'a> {
    /// Decodes `application/x-www-form-urlencoded` text. Never fails: bytes that are not
    /// UTF-8 become U+FFFD, as in every form decoder built on `form_urlencoded`. Values are
    /// borrowed from `body` unless they had to be unescaped.
    pub fn decode(body: &'a [u8]) -> Self {
        let mut form = V1Form::default();
        for (key, value) in form_urlencoded::parse(body) {
            let slot = match &*key {
                "ip" => &mut form.ip,
                "port" => &mut form.port,
                "revision" => &mut form.revision,
                "service_repo_name" => &mut form.service_repo_name,
                "tags" => &mut form.tags,
                "auto_ip" => {
                    form.auto_ip.push(value);
                    continue;
                }
                _ => continue,
            };
            *slot = Some(value);
        }
        form
    }
}

/// A parsed v1 check-in: the endpoint, and the keys of the tag object the body sent.
#[derive(Debug, Clone, PartialEq)]
pub struct V1Checkin {
    pub endpoint: Endpoint,
    /// Empty when the body sent no tags (or an empty tag string).
    pub sent_tags: BTreeSet<String>,
}

impl V1Checkin {
    /// A JSON body: an [`EndpointSpec`] whose `tags` is an object or a JSON string.
    pub fn from_json(service: &ServiceName, body: &[u8]) -> Result<Self, ValidationError> {
        let spec = serde_json::from_slice::<EndpointSpec>(body)
            .map_err(|e| ValidationError::Malformed(e.to_string()))?;
        Self::from_spec(service, spec)
    }

    /// A decoded form (its `auto_ip` already resolved by the caller; it is not read here).
    pub fn from_form(service: &ServiceName, form: V1Form<'_>) -> Result<Self, ValidationError> {
        let text = |v: Option<Cow<'_, str>>| v.map(Cow::into_owned);
        let spec = EndpointSpec {
            service: None,
            ip: text(form.ip),
            port: form
                .port
                .map_or(Value::Null, |p| Value::String(p.into_owned())),
            revision: text(form.revision),
            service_repo_name: text(form.service_repo_name),
            tags: form
                .tags
                .map_or(Value::Null, |t| Value::String(t.into_owned())),
        };
        Self::from_spec(service, spec)
    }

    fn from_spec(service: &ServiceName, spec: EndpointSpec) -> Result<Self, ValidationError> {
        let (endpoint, sent_tags) = spec.into_endpoint_with_tag_keys(service)?;
        Ok(V1Checkin {
            endpoint,
            sent_tags,
        })
    }
}

#[cfg(test)]
mod tests;
