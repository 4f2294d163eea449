//! The invariants, judged each round against what the agents and the proxy answered and
//! the engine's record of the fleet ([`super::model`]). No I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::bounds::*;
use super::model::{Ep, EpState, Model, Owner, Viewer};

/// One breach of an invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    pub check: &'static str,
    /// Since the run's start: first seen...
    pub at: Duration,
    /// ...and last seen (a breach that lasts until the end is a stuck state, not a blip).
    pub last: Duration,
    /// Rounds that saw it.
    pub rounds: u64,
    pub details: String,
}

/// What a viewer answered this round: `service` → `addr` set, and for the proxy each
/// address's (discovery, decision).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub hosts: BTreeMap<String, BTreeSet<String>>,
    /// Agents: `X-Tidings-Registry-Age-Ms` of the web lookup; `-1` means the agent never
    /// knew its registry data current (the API reference's "never").
    pub age_ms: Option<i64>,
    /// Proxy: addr → (discovery, decision).
    pub routing: BTreeMap<String, (String, String)>,
}

/// The invariants, with the memory they need across rounds.
/// The registry ages agents reported while every replica was healthy and settled: not yet
/// asserted (see `ASSERT_FRESH_WHEN_HEALTHY`), so summed up for the seed's summary, with
/// where the worst was seen to find it in the schedule.
#[derive(Debug, Default, Clone)]
pub struct HealthyAge {
    pub samples: u64,
    /// Samples above `FRESH_WHEN_HEALTHY`, "never current" ones included.
    pub over: u64,
    /// Samples that said "never current" (`-1`), which `max_ms` does not count.
    pub never: u64,
    pub max_ms: i64,
    /// The agent and the moment (since the seed began) of the largest.
    pub worst: Option<(usize, Duration)>,
}

impl HealthyAge {
    fn record(&mut self, age_ms: i64, agent: usize, at: Duration) {
        self.samples += 1;
        if age_ms < 0 {
            self.over += 1;
            self.never += 1;
            if self.worst.is_none() {
                self.worst = Some((agent, at));
            }
            return;
        }
        if age_ms > i64::try_from(FRESH_WHEN_HEALTHY.as_millis()).unwrap_or(i64::MAX) {
            self.over += 1;
        }
        if self.worst.is_none() || age_ms > self.max_ms {
            self.max_ms = age_ms;
            self.worst = Some((agent, at));
        }
    }
}

impl std::fmt::Display for HealthyAge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples, {} over {:?} ({} never current), max {} ms",
            self.samples, self.over, FRESH_WHEN_HEALTHY, self.never, self.max_ms
        )?;
        if let Some((agent, at)) = self.worst {
            write!(f, " (agent {agent} at {at:.1?})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Judge {
    /// (viewer, viewer life, ep key, ep life): a host that is now required in that view.
    established: HashSet<(Viewer, u64, String, u64)>,
    /// Per check, how many evaluations were made.
    pub checks: BTreeMap<&'static str, u64>,
    /// Registry ages seen while every replica was healthy and settled.
    pub healthy_age: HealthyAge,
    pub violations: Vec<Violation>,
    /// (check, subject) of violations already recorded → index in `violations`, so one
    /// breach held for many rounds is reported once (first and last moment, rounds).
    reported: HashMap<(&'static str, String), usize>,
}

impl Judge {
    fn count(&mut self, check: &'static str) {
        *self.checks.entry(check).or_default() += 1;
    }

    fn violate(
        &mut self,
        m: &Model,
        now: Instant,
        check: &'static str,
        subject: String,
        details: String,
    ) {
        let at = now.duration_since(m.t0);
        if let Some(v) = self
            .reported
            .get(&(check, subject.clone()))
            .and_then(|&i| self.violations.get_mut(i))
        {
            v.last = at;
            v.rounds += 1;
            return;
        }
        self.reported
            .insert((check, subject), self.violations.len());
        self.violations.push(Violation {
            check,
            at,
            last: at,
            rounds: 1,
            details,
        });
    }

    /// Judges what `viewer` answered at `now` (an unreachable viewer counts as empty).
    pub fn judge(&mut self, m: &Model, now: Instant, viewer: Viewer, seen: &Seen) {
        let Some((v_since, v_life)) = m.viewer_since(viewer) else {
            return;
        };
        let round = Round {
            m,
            now,
            viewer,
            seen,
            v_since,
            v_life,
            reg: m.registry_healthy_since(),
        };
        for (key, ep) in &m.eps {
            if viewer == Viewer::Proxy && ep.backend.is_none() {
                continue;
            }
            let in_view = match viewer {
                Viewer::Agent(_) => seen
                    .hosts
                    .get(&ep.service)
                    .is_some_and(|h| h.contains(&ep.addr)),
                Viewer::Proxy => seen
                    .routing
                    .get(&ep.addr)
                    .is_some_and(|(_, d)| d == "route"),
            };
            if let Some(live) = m.live_since(ep) {
                self.judge_live(&round, key, ep, live, in_view);
            }
            if let EpState::Left { at } = ep.state {
                self.judge_left(&round, key, ep, at, in_view);
            }
        }
        match viewer {
            Viewer::Proxy => self.judge_failing(m, now, seen),
            Viewer::Agent(a) => self.judge_freshness(m, now, a, v_since, seen),
        }
    }

    /// `live_in_views`: `ep`, live since `live.0` (in its life `live.1`), must be in the
    /// view once its bound has passed, and stays required from then on.
    fn judge_live(
        &mut self,
        r: &Round<'_>,
        key: &str,
        ep: &Ep,
        (since, life): (Instant, u64),
        in_view: bool,
    ) {
        let (m, viewer) = (r.m, r.viewer);
        // The proxy's requirement also restarts when the backend comes back: health
        // checks must first find it healthy again.
        let life = match (viewer, ep.backend.and_then(|b| m.backends.get(b))) {
            (Viewer::Proxy, Some((_, u))) => life * 1_000 + u.life,
            _ => life,
        };
        let id = (viewer, r.v_life, key.to_string(), life);
        if !self.established.contains(&id)
            && required_from(r, ep, since).is_some_and(|f| r.now >= f)
        {
            self.established.insert(id.clone());
        }
        let backend_up = ep
            .backend
            .and_then(|b| m.backends.get(b))
            .is_none_or(|(_, u)| u.up);
        if self.established.contains(&id) && (viewer != Viewer::Proxy || backend_up) {
            self.count("live_in_views");
            if !in_view {
                self.violate(
                    m,
                    r.now,
                    "live_in_views",
                    format!("{viewer:?} {key}"),
                    format!(
                        "{viewer:?} lacks live {key} (live since {:.1?})",
                        since.duration_since(m.t0)
                    ),
                );
            }
        }
    }

    /// `deregistered_leaves`: `ep`, deregistered at `at`, must have left the view once its
    /// bound has passed.
    fn judge_left(&mut self, r: &Round<'_>, key: &str, ep: &Ep, at: Instant, in_view: bool) {
        let (m, viewer) = (r.m, r.viewer);
        let owner_net = match ep.owner {
            Owner::Agent(a) => m.net_quiet_since(a),
            Owner::Cron(_) => Some(m.t0),
        };
        let me_net = match viewer {
            Viewer::Agent(a) => m.net_quiet_since(a),
            Viewer::Proxy => m.net_quiet_since(m.proxy_agent),
        };
        let bound = match viewer {
            Viewer::Agent(_) => LEAVE,
            Viewer::Proxy => PROXY_LEAVE,
        };
        let due = r
            .reg
            .zip(owner_net)
            .zip(me_net)
            .map(|((reg, o), n)| at.max(r.v_since).max(reg).max(o).max(n) + bound);
        if due.is_some_and(|d| r.now >= d) {
            self.count("deregistered_leaves");
            // The proxy may keep routing a healthy host discovery dropped (health
            // checks win); what must go is its discovery status.
            let still = match viewer {
                Viewer::Agent(_) => in_view,
                Viewer::Proxy => r
                    .seen
                    .routing
                    .get(&ep.addr)
                    .is_some_and(|(d, _)| d == "present"),
            };
            if still {
                self.violate(
                    m,
                    r.now,
                    "deregistered_leaves",
                    format!("{viewer:?} {key} {at:?}"),
                    format!(
                        "{viewer:?} still lists {key}, deregistered at {:.1?}",
                        at.duration_since(m.t0)
                    ),
                );
            }
        }
    }

    fn judge_failing(&mut self, m: &Model, now: Instant, seen: &Seen) {
        for (addr, up) in &m.backends {
            if up.up || now < up.since + FAILING {
                continue;
            }
            self.count("no_route_to_failing");
            if seen.routing.get(addr).is_some_and(|(_, d)| d == "route") {
                self.violate(
                    m,
                    now,
                    "no_route_to_failing",
                    format!("{addr} {:?}", up.since),
                    format!(
                        "proxy routes to {addr}, whose backend died at {:.1?}",
                        up.since.duration_since(m.t0)
                    ),
                );
            }
        }
    }

    fn judge_freshness(
        &mut self,
        m: &Model,
        now: Instant,
        agent: usize,
        v_since: Instant,
        seen: &Seen,
    ) {
        let Some(age) = seen.age_ms else { return };
        // Replicas share one table, and agents pass registry data on by gossip: the data is
        // only known stale once every replica is dead, since the last of them died.
        let died = m
            .replicas
            .iter()
            .map(|r| r.killed_at)
            .try_fold(m.t0, |acc, k| k.map(|k| acc.max(k)));
        if let Some(died) = died.filter(|d| *d >= v_since) {
            let floor = now.duration_since(died).saturating_sub(FRESH_SLACK);
            let floor_ms = i64::try_from(floor.as_millis()).unwrap_or(i64::MAX);
            self.count("freshness_honest");
            // `-1` ("never known current") claims no freshness at all: honest whatever
            // the outage (seed 10780137804266489355: the registry died during its first
            // warm-up, before any agent had taken an authoritative answer).
            if (0..floor_ms).contains(&age) {
                self.violate(
                    m,
                    now,
                    "freshness_honest",
                    format!("agent {agent} {died:?}"),
                    format!(
                        "agent {agent} says its data is {age} ms old, but the registry died {:.1?} ago",
                        now.duration_since(died)
                    ),
                );
            }
        } else if let Some(healthy) = m.registry_healthy_since()
            // After the warm-up a (re)start may begin: warming answers rightly leave the
            // data's age growing (the first 5.7 s of every seed, before this was excluded).
            && now >= (healthy + REGISTRY_INTERVAL).max(v_since) + AGENT_EP_VISIBLE
        {
            self.healthy_age
                .record(age, agent, now.duration_since(m.t0));
            if ASSERT_FRESH_WHEN_HEALTHY {
                self.count("freshness_honest");
                if age > i64::try_from(FRESH_WHEN_HEALTHY.as_millis()).unwrap_or(i64::MAX) {
                    self.violate(
                        m,
                        now,
                        "freshness_honest",
                        format!("agent {agent} healthy age"),
                        format!("agent {agent} says {age} ms old while its registry is healthy"),
                    );
                }
            }
        }
    }
}

/// One viewer's answer under judgement, with what each check of it needs.
struct Round<'a> {
    m: &'a Model,
    now: Instant,
    viewer: Viewer,
    seen: &'a Seen,
    /// The viewer's up-time: since when, and in which life.
    v_since: Instant,
    v_life: u64,
    /// Since when every registry replica has served; `None` while one does not.
    reg: Option<Instant>,
}

/// The moment `ep`, live since `since`, must be in the view from: its owner's, the
/// viewer's, the registry's and (for the proxy) its backend's bounds all passed. `None`
/// while a registry replica or the backend is down.
fn required_from(r: &Round<'_>, ep: &Ep, since: Instant) -> Option<Instant> {
    let extra = match r.viewer {
        Viewer::Agent(_) => Duration::ZERO,
        Viewer::Proxy => PROXY_EXTRA,
    };
    let backend_ok = match (r.viewer, ep.backend) {
        (Viewer::Proxy, Some(b)) => {
            r.m.backends
                .get(b)
                .and_then(|(_, u)| u.up_since())
                .map(|s| s + BACKEND_HEALTHY)
        }
        _ => Some(since),
    };
    let ep_bound = match ep.owner {
        Owner::Agent(_) => AGENT_EP_VISIBLE,
        Owner::Cron(_) => CRON_EP_VISIBLE,
    };
    r.reg.zip(backend_ok).map(|(reg, b)| {
        (since + ep_bound)
            .max(r.v_since + VIEWER_VISIBLE)
            .max(reg + REGISTRY_VISIBLE)
            .max(b)
            + extra
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "10.0.0.1:8080";

    /// A model of one agent (also the proxy's) and one registry, everything up for a minute.
    fn settled() -> (Model, Instant) {
        let t0 = Instant::now();
        let long_ago = t0.checked_sub(Duration::from_secs(60)).unwrap_or(t0);
        let mut m = Model::new(long_ago, 1, 1, vec![WEB.to_string()], 0);
        m.add_ep("web", WEB, Owner::Agent(0), Some(0), long_ago);
        (m, t0)
    }

    fn seen(with: bool) -> Seen {
        let mut s = Seen::default();
        let hosts = if with {
            [WEB.to_string()].into()
        } else {
            BTreeSet::new()
        };
        s.hosts.insert("web".to_string(), hosts);
        s.age_ms = Some(0);
        s
    }

    #[test]
    fn a_settled_live_host_must_be_in_the_view() {
        let (m, now) = settled();
        let mut j = Judge::default();
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now, Viewer::Agent(0), &seen(false));
        assert_eq!(j.violations.len(), 1);
        assert_eq!(j.violations[0].check, "live_in_views");
    }

    #[test]
    fn a_re_registered_host_gets_its_bound_again() {
        let (mut m, now) = settled();
        let mut j = Judge::default();
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        m.set_ep("web", WEB, EpState::Left { at: now });
        m.set_ep(
            "web",
            WEB,
            EpState::Live {
                since: now,
                life: 0,
            },
        );
        j.judge(
            &m,
            now + Duration::from_millis(100),
            Viewer::Agent(0),
            &seen(false),
        );
        assert!(j.violations.is_empty(), "{:?}", j.violations);
        j.judge(
            &m,
            now + 2 * AGENT_EP_VISIBLE,
            Viewer::Agent(0),
            &seen(false),
        );
        assert_eq!(j.violations.len(), 1);
    }

    #[test]
    fn a_deregistered_host_must_leave_within_the_bound() {
        let (mut m, now) = settled();
        m.set_ep("web", WEB, EpState::Left { at: now });
        let mut j = Judge::default();
        j.judge(&m, now + LEAVE / 2, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now + LEAVE, Viewer::Agent(0), &seen(true));
        assert_eq!(j.violations[0].check, "deregistered_leaves");
    }

    #[test]
    fn an_agent_must_not_claim_fresh_data_after_the_registry_died() {
        let (mut m, now) = settled();
        let mut j = Judge::default();
        // Seen while healthy: from here on the host is required, through the outage too.
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        m.replicas[0].serving.set(false, now);
        m.replicas[0].killed_at = Some(now);
        j.judge(&m, now + FRESH_SLACK, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now + 2 * FRESH_SLACK, Viewer::Agent(0), &seen(true));
        assert_eq!(j.violations[0].check, "freshness_honest");
        // A host that stays live is still required while the registry is down.
        j.judge(&m, now + 2 * FRESH_SLACK, Viewer::Agent(0), &seen(false));
        assert!(j.violations.iter().any(|v| v.check == "live_in_views"));
    }

    #[test]
    fn never_current_is_an_honest_age_during_an_outage() {
        let (mut m, now) = settled();
        let mut j = Judge::default();
        m.replicas[0].serving.set(false, now);
        m.replicas[0].killed_at = Some(now);
        let mut never = seen(true);
        never.age_ms = Some(-1);
        j.judge(&m, now + 2 * FRESH_SLACK, Viewer::Agent(0), &never);
        assert!(j.violations.is_empty(), "{:?}", j.violations);
        assert_eq!(j.checks.get("freshness_honest"), Some(&1));
    }

    #[test]
    fn never_current_while_healthy_counts_as_over_the_bound() {
        let mut h = HealthyAge::default();
        h.record(-1, 2, Duration::from_secs(7));
        h.record(40, 1, Duration::from_secs(8));
        assert_eq!((h.samples, h.over, h.never, h.max_ms), (2, 1, 1, 40));
    }
}
