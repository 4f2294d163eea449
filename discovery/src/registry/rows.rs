//! The rows of a view, held as one shared list per service ([`ServiceRows`]). A catalog
//! view rebuilt after one endpoint changed shares every other service's list with the view
//! before it and with the store's last answer, so a change costs copies of the service it
//! touched, not of the catalog.

use schema::Endpoint;

use crate::store::{ServiceRows, StoredEndpoint, group_by_service};

/// Rows sorted by key (service, then address), one list per non-empty service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    services: Vec<ServiceRows>,
    len: usize,
}

type Each<'a> = fn(&'a ServiceRows) -> std::slice::Iter<'a, StoredEndpoint>;

impl Rows {
    /// `services` must be in name order, each non-empty and in key order.
    pub fn from_services(services: Vec<ServiceRows>) -> Self {
        debug_assert!(services.iter().all(|s| !s.is_empty()));
        let len = services.iter().map(|s| s.len()).sum();
        Rows { services, len }
    }

    /// Rows in any order.
    pub fn from_vec(rows: Vec<StoredEndpoint>) -> Self {
        Self::from_services(group_by_service(rows))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every row, in key order.
    pub fn iter(
        &self,
    ) -> std::iter::FlatMap<
        std::slice::Iter<'_, ServiceRows>,
        std::slice::Iter<'_, StoredEndpoint>,
        Each<'_>,
    > {
        let each: Each<'_> = |s| s.iter();
        self.services.iter().flat_map(each)
    }

    /// One list per service, in name order.
    pub fn services(&self) -> &[ServiceRows] {
        &self.services
    }

    /// Whether `ep`'s key is among the rows.
    pub fn contains(&self, ep: &Endpoint) -> bool {
        let Ok(i) = self.services.binary_search_by(|s| {
            s.first()
                .map(|r| &r.endpoint.service)
                .cmp(&Some(&ep.service))
        }) else {
            return false;
        };
        self.services[i]
            .binary_search_by(|r| (r.endpoint.ip, r.endpoint.port).cmp(&(ep.ip, ep.port)))
            .is_ok()
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = &'a StoredEndpoint;
    type IntoIter = std::iter::FlatMap<
        std::slice::Iter<'a, ServiceRows>,
        std::slice::Iter<'a, StoredEndpoint>,
        Each<'a>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}
