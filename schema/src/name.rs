use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A service name: 1–63 chars of `[a-z0-9._-]`, starting with a letter or digit (DNS-label
/// friendly, so it can double as a Host header or an Envoy cluster name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: impl Into<String>) -> Result<Self, ValidationError> {
        let name = name.into();
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.chars().all(ok_char)
            && name.starts_with(|c: char| c.is_ascii_alphanumeric());
        if valid {
            Ok(Self(name))
        } else {
            Err(ValidationError::ServiceName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ServiceName {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string of at most `MAX` bytes. Used for every free-text field so that no client can
/// make the registry or a gossip packet carry an unbounded string.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BoundedString<const MAX: usize>(String);

impl<const MAX: usize> BoundedString<MAX> {
    pub fn new(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        if s.len() > MAX {
            return Err(ValidationError::TooLong {
                field: "string",
                max: MAX,
            });
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<const MAX: usize> TryFrom<String> for BoundedString<MAX> {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl<const MAX: usize> From<BoundedString<MAX>> for String {
    fn from(s: BoundedString<MAX>) -> String {
        s.0
    }
}

impl<const MAX: usize> fmt::Display for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Deploy revision (a git sha, a version): free text, at most 128 bytes.
pub type Revision = BoundedString<128>;
/// A tag value (zone, region, instance id or a free-form tag): at most 256 bytes.
pub type TagValue = BoundedString<256>;
/// lyft/discovery's `service_repo_name`: at most 128 bytes.
pub type RepoName = BoundedString<128>;

/// A free-form tag key: 1–64 chars of `[A-Za-z0-9._:/-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagKey(String);

impl TagKey {
    pub fn new(key: impl Into<String>) -> Result<Self, ValidationError> {
        let key = key.into();
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:/-".contains(c);
        if !key.is_empty() && key.len() <= 64 && key.chars().all(ok_char) {
            Ok(Self(key))
        } else {
            Err(ValidationError::TagKey(key))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TagKey {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TagKey> for String {
    fn from(k: TagKey) -> String {
        k.0
    }
}
