//! The admin listener's open connections and what each is doing, so that none can be held
//! open for free: a connection waiting for a request head must finish it within the header
//! read timeout, a keep-alive connection between requests closes after the idle timeout, and
//! at the connection cap a newcomer closes the connection that has waited longest. Sans-IO:
//! the caller passes the clock and carries out the closes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests, nothing received: the idle timeout runs.
    Idle,
    /// A request head has started to arrive (or the connection is new): the header read
    /// timeout runs.
    Reading,
    /// This many requests are being answered (HTTP/2 may run several): no timer.
    Busy(u32),
}

#[derive(Debug)]
struct Entry<T> {
    phase: Phase,
    /// When the phase began.
    since: Instant,
    handle: T,
}

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    HeaderTimeout,
    IdleTimeout,
    /// Made room for a newer connection at the cap.
    Evicted,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Evicted => "evicted",
        }
    }
}

/// The answer to a new connection.
#[derive(Debug)]
pub enum Admit<T> {
    /// Serve it under this id; close the evicted connection, if any, to make room.
    Accepted { id: u64, evicted: Option<T> },
    /// At the cap with every connection answering a request: refuse the newcomer.
    Refused,
}

/// The open connections, each with a handle `T` the caller closes it by.
#[derive(Debug)]
pub struct ConnTable<T> {
    limits: Limits,
    conns: BTreeMap<u64, Entry<T>>,
    next_id: u64,
}

impl<T> ConnTable<T> {
    pub fn new(limits: Limits) -> Self {
        ConnTable {
            limits,
            conns: BTreeMap::new(),
            next_id: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// A new connection. It starts as if reading a head: one that sends nothing gets no more
    /// time than one that sends half a request.
    pub fn admit(&mut self, handle: T, now: Instant) -> Admit<T> {
        let mut evicted = None;
        if self.conns.len() >= self.limits.max_connections.max(1) {
            // The connection waiting longest: ids grow with age, so ties go to the oldest.
            let victim = self
                .conns
                .iter()
                .filter(|(_, e)| !matches!(e.phase, Phase::Busy(_)))
                .min_by_key(|(id, e)| (e.since, **id))
                .map(|(id, _)| *id);
            match victim.and_then(|id| self.conns.remove(&id)) {
                Some(e) => evicted = Some(e.handle),
                None => return Admit::Refused,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(
            id,
            Entry {
                phase: Phase::Reading,
                since: now,
                handle,
            },
        );
        Admit::Accepted { id, evicted }
    }

    /// Bytes arrived: on an idle connection, a request head has started.
    pub fn bytes_read(&mut self, id: u64, now: Instant) {
        if let Some(e) = self.conns.get_mut(&id) {
            if e.phase == Phase::Idle {
                e.phase = Phase::Reading;
                e.since = now;
            }
        }
    }

    /// A request head is complete and is being answered.
    pub fn request_started(&mut self, id: u64, now: Instant) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.phase = match e.phase {
                Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
                Phase::Idle | Phase::Reading => Phase::Busy(1),
            };
            e.since = now;
        }
    }

    /// A response has been sent (or abandoned).
    pub fn request_finished(&mut self, id: u64, now: Instant) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.phase = match e.phase {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Idle,
            };
            e.since = now;
        }
    }

    /// When the connection's timer runs out, if one runs; `None` while it answers requests
    /// or once it is gone.
    pub fn deadline(&self, id: u64) -> Option<Instant> {
        let e = self.conns.get(&id)?;
        match e.phase {
            Phase::Idle => Some(e.since + self.limits.idle_timeout),
            Phase::Reading => Some(e.since + self.limits.header_read_timeout),
            Phase::Busy(_) => None,
        }
    }

    /// Whether the connection's timer has run out at `now`, and which.
    pub fn expired(&self, id: u64, now: Instant) -> Option<Closed> {
        let e = self.conns.get(&id)?;
        let deadline = self.deadline(id)?;
        (now >= deadline).then_some(match e.phase {
            Phase::Idle => Closed::IdleTimeout,
            _ => Closed::HeaderTimeout,
        })
    }

    #[cfg(test)]
    fn contains(&self, id: u64) -> bool {
        self.conns.contains_key(&id)
    }

    /// Any one connection, taken out of the table (to close them all).
    pub fn remove_any(&mut self) -> Option<T> {
        self.conns.pop_first().map(|(_, e)| e.handle)
    }

    /// The connection has closed (or is being closed).
    pub fn remove(&mut self, id: u64) -> Option<T> {
        self.conns.remove(&id).map(|e| e.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(60);

    fn table(max: usize) -> ConnTable<&'static str> {
        ConnTable::new(Limits {
            header_read_timeout: HEAD,
            idle_timeout: IDLE,
            max_connections: max,
        })
    }

    fn accept(t: &mut ConnTable<&'static str>, name: &'static str, now: Instant) -> u64 {
        match t.admit(name, now) {
            Admit::Accepted { id, evicted: None } => id,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn a_new_connection_must_send_its_head_within_the_header_timeout() {
        let t0 = Instant::now();
        let mut t = table(8);
        let id = accept(&mut t, "a", t0);
        assert_eq!(t.deadline(id), Some(t0 + HEAD));
        assert_eq!(t.expired(id, t0 + HEAD - Duration::from_millis(1)), None);
        // Trickling bytes does not move the deadline.
        t.bytes_read(id, t0 + Duration::from_secs(4));
        assert_eq!(t.expired(id, t0 + HEAD), Some(Closed::HeaderTimeout));
    }

    #[test]
    fn between_requests_the_idle_timeout_runs_until_the_next_head_starts() {
        let t0 = Instant::now();
        let mut t = table(8);
        let id = accept(&mut t, "a", t0);
        t.request_started(id, t0);
        assert_eq!(t.deadline(id), None, "no timer while answering");
        assert_eq!(t.expired(id, t0 + IDLE * 10), None);
        let t1 = t0 + Duration::from_secs(1);
        t.request_finished(id, t1);
        assert_eq!(t.deadline(id), Some(t1 + IDLE));
        assert_eq!(t.expired(id, t1 + IDLE), Some(Closed::IdleTimeout));
        // The next head starts: it gets the header timeout from its first byte.
        let t2 = t1 + Duration::from_secs(30);
        t.bytes_read(id, t2);
        assert_eq!(t.deadline(id), Some(t2 + HEAD));
        assert_eq!(t.expired(id, t2 + HEAD), Some(Closed::HeaderTimeout));
    }

    #[test]
    fn concurrent_requests_keep_a_connection_busy_until_the_last_ends() {
        let t0 = Instant::now();
        let mut t = table(8);
        let id = accept(&mut t, "h2", t0);
        t.request_started(id, t0);
        t.request_started(id, t0);
        t.request_finished(id, t0);
        assert_eq!(t.deadline(id), None);
        t.request_finished(id, t0);
        assert_eq!(t.deadline(id), Some(t0 + IDLE));
    }

    #[test]
    fn at_the_cap_the_connection_waiting_longest_makes_room() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = table(3);
        let a = accept(&mut t, "a", t0);
        let b = accept(&mut t, "b", t0 + s);
        let c = accept(&mut t, "c", t0 + s * 2);
        // `a` answers a request: it is not waiting, so `b` goes.
        t.request_started(a, t0 + s * 3);
        match t.admit("d", t0 + s * 4) {
            Admit::Accepted { evicted, .. } => assert_eq!(evicted, Some("b")),
            Admit::Refused => panic!("refused"),
        }
        assert!(!t.contains(b) && t.contains(c));
        assert_eq!(t.len(), 3);
        // Once idle, `a` has waited since its request ended: `c` is older.
        t.request_finished(a, t0 + s * 5);
        match t.admit("e", t0 + s * 6) {
            Admit::Accepted { evicted, .. } => assert_eq!(evicted, Some("c")),
            Admit::Refused => panic!("refused"),
        }
    }

    #[test]
    fn at_the_cap_with_every_connection_busy_the_newcomer_is_refused() {
        let t0 = Instant::now();
        let mut t = table(2);
        for name in ["a", "b"] {
            let id = accept(&mut t, name, t0);
            t.request_started(id, t0);
        }
        assert!(matches!(t.admit("c", t0), Admit::Refused));
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove(0), Some("a"));
        assert!(matches!(
            t.admit("c", t0),
            Admit::Accepted { evicted: None, .. }
        ));
    }

    #[test]
    fn events_for_closed_connections_are_ignored() {
        let t0 = Instant::now();
        let mut t = table(2);
        let id = accept(&mut t, "a", t0);
        assert_eq!(t.remove(id), Some("a"));
        t.bytes_read(id, t0);
        t.request_started(id, t0);
        t.request_finished(id, t0);
        assert_eq!(t.deadline(id), None);
        assert_eq!(t.expired(id, t0 + IDLE), None);
        assert_eq!(t.len(), 0);
    }
}
