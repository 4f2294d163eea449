use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::wire::tag;
use crate::{TagKey, TagValue, ValidationError};

/// At most this many free-form tags per endpoint (docs/ARCHITECTURE.md#schema).
pub const MAX_EXTRA_TAGS: usize = 32;

/// An endpoint's load-balancing weight, 1..=100 as in Envoy v1 SDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Weight(u8);

impl Weight {
    pub const DEFAULT: Weight = Weight(100);

    pub fn new(w: u64) -> Result<Self, ValidationError> {
        match u8::try_from(w) {
            Ok(w @ 1..=100) => Ok(Self(w)),
            _ => Err(ValidationError::Weight(w.to_string())),
        }
    }

    /// Parses the decimal text a form field carries.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        s.trim()
            .parse::<u64>()
            .map_err(|_| ValidationError::Weight(s.to_string()))
            .and_then(Self::new)
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Weight {
    type Error = ValidationError;
    fn try_from(w: u8) -> Result<Self, Self::Error> {
        Self::new(u64::from(w))
    }
}

impl From<Weight> for u8 {
    fn from(w: Weight) -> u8 {
        w.0
    }
}

/// An endpoint's tags: the ones Envoy and the proxy understand, plus bounded free-form ones.
///
/// Serde derives give the compact wire form (bincode cannot carry flattened maps); the v1 JSON
/// form, where every tag sits in one flat object, goes through [`Tags::to_json`] and
/// [`Tags::from_json`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "TagsFields")]
pub struct Tags {
    pub az: Option<TagValue>,
    pub region: Option<TagValue>,
    pub instance_id: Option<TagValue>,
    pub canary: bool,
    pub load_balancing_weight: Weight,
    pub extra: BTreeMap<TagKey, TagValue>,
}

/// The same fields, before the free-form tag count is checked.
#[derive(Deserialize)]
struct TagsFields {
    az: Option<TagValue>,
    region: Option<TagValue>,
    instance_id: Option<TagValue>,
    canary: bool,
    load_balancing_weight: Weight,
    extra: BTreeMap<TagKey, TagValue>,
}

impl TryFrom<TagsFields> for Tags {
    type Error = ValidationError;
    fn try_from(f: TagsFields) -> Result<Self, Self::Error> {
        check_extra_count(f.extra.len())?;
        Ok(Tags {
            az: f.az,
            region: f.region,
            instance_id: f.instance_id,
            canary: f.canary,
            load_balancing_weight: f.load_balancing_weight,
            extra: f.extra,
        })
    }
}

fn check_extra_count(got: usize) -> Result<(), ValidationError> {
    if got > MAX_EXTRA_TAGS {
        return Err(ValidationError::TooManyTags {
            max: MAX_EXTRA_TAGS,
            got,
        });
    }
    Ok(())
}

impl Tags {
    /// The flat v1 JSON object: `az`, `region`, `instance_id` when set, `canary` and
    /// `load_balancing_weight` always (Envoy v1 SDS reads those three), then the free-form tags.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (k, v) in &self.extra {
            m.insert(
                k.as_str().to_string(),
                Value::String(v.as_str().to_string()),
            );
        }
        let known = [
            (tag::AZ, &self.az),
            (tag::REGION, &self.region),
            (tag::INSTANCE_ID, &self.instance_id),
        ];
        for (k, v) in known {
            if let Some(v) = v {
                m.insert(k.to_string(), Value::String(v.as_str().to_string()));
            }
        }
        m.insert(tag::CANARY.into(), Value::Bool(self.canary));
        m.insert(
            tag::LOAD_BALANCING_WEIGHT.into(),
            Value::from(self.load_balancing_weight.get()),
        );
        m
    }

    /// Parses a flat v1 tag object. Lenient where lyft/discovery clients differ (`canary` as
    /// `"true"`, a weight as a numeric string, numbers in free-form tags), strict on bounds.
    pub fn from_json(value: &Value) -> Result<Self, ValidationError> {
        let obj = match value {
            Value::Object(obj) => obj,
            Value::Null => return Ok(Tags::default()),
            _ => {
                return Err(ValidationError::Malformed(
                    "tags must be a JSON object".into(),
                ));
            }
        };
        let mut tags = Tags::default();
        for (key, v) in obj {
            match key.as_str() {
                tag::AZ => tags.az = opt_string(key, v)?,
                tag::REGION => tags.region = opt_string(key, v)?,
                tag::INSTANCE_ID => tags.instance_id = opt_string(key, v)?,
                tag::CANARY => tags.canary = parse_bool(key, v)?,
                tag::LOAD_BALANCING_WEIGHT => tags.load_balancing_weight = parse_weight(v)?,
                _ => {
                    check_extra_count(tags.extra.len() + 1)?;
                    let val = opt_string(key, v)?.unwrap_or_default();
                    tags.extra.insert(TagKey::new(key.clone())?, val);
                }
            }
        }
        Ok(tags)
    }

    /// The zone (`az`) the proxy uses for zone-aware load balancing.
    pub fn zone(&self) -> Option<&str> {
        self.az.as_ref().map(|z| z.as_str())
    }
}

fn opt_string(key: &str, v: &Value) -> Result<Option<TagValue>, ValidationError> {
    let s = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(ValidationError::TagType {
                key: key.to_string(),
                expected: "a string",
            });
        }
    };
    TagValue::new(s)
        .map(Some)
        .map_err(|_| ValidationError::TooLong {
            field: "tag value",
            max: 256,
        })
}

fn parse_bool(key: &str, v: &Value) -> Result<bool, ValidationError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") || s == "1" => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") || s == "0" || s.is_empty() => {
            Ok(false)
        }
        Value::Null => Ok(false),
        _ => Err(ValidationError::TagType {
            key: key.to_string(),
            expected: "a boolean",
        }),
    }
}

fn parse_weight(v: &Value) -> Result<Weight, ValidationError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map_or_else(|| Err(ValidationError::Weight(n.to_string())), Weight::new),
        Value::String(s) => Weight::parse(s),
        Value::Null => Ok(Weight::DEFAULT),
        other => Err(ValidationError::Weight(other.to_string())),
    }
}
