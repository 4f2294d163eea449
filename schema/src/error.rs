use thiserror::Error;

/// Why a value from outside the process was refused. The message is safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error(
        "invalid service name {0:?}: 1-63 chars of [a-z0-9._-], starting with a letter or digit"
    )]
    ServiceName(String),
    #[error("{field} is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("invalid tag key {0:?}: 1-64 chars of [A-Za-z0-9._:/-]")]
    TagKey(String),
    #[error("at most {max} free-form tags are allowed, got {got}")]
    TooManyTags { max: usize, got: usize },
    #[error("tag {key:?} must be {expected}")]
    TagType { key: String, expected: &'static str },
    #[error("load_balancing_weight must be an integer from 1 to 100, got {0}")]
    Weight(String),
    #[error("invalid ip address {0:?}")]
    Ip(String),
    #[error("invalid port {0:?}: must be 1-65535")]
    Port(String),
    #[error("missing required field {0}")]
    Missing(&'static str),
    #[error("too many endpoints in one check-in: at most {max}, got {got}")]
    TooManyEndpoints { max: usize, got: usize },
    #[error("malformed body: {0}")]
    Malformed(String),
}
