//! The proxy's IO shells: listeners, the two request paths, upstream connections, health
//! checkers and the membership watch. They apply what `crate::core` decides.

pub(crate) mod attempts;
