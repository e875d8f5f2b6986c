//! Prometheus metrics of the API, in the text exposition format: requests
//! by route and outcome, their durations, requests and operations in
//! flight, and the Argon2 memory budget. Routes are labelled by pattern
//! (`/v1/volumes/{id}/attach`), never by volume id, so the label sets stay
//! bounded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::luks::kdf::MemoryBudget;

/// Upper bounds of the duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// The agent's metrics.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    durations: Mutex<BTreeMap<&'static str, Histogram>>,
    in_flight: AtomicI64,
}

/// A request being served; dropping it (answered, or abandoned because
/// its connection closed first) ends it.
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The routes of the API, as patterns (`{id}` stands for one path
/// segment): the router is built from this list and metrics label
/// requests with it, so the two cannot disagree.
pub const ROUTES: &[&str] = &[
    "/healthz",
    "/metrics",
    "/v1/volumes",
    "/v1/volumes/{id}",
    "/v1/volumes/{id}/attach",
    "/v1/volumes/{id}/detach",
    "/v1/volumes/{id}/extend",
    "/v1/images/{id}/verify",
];

/// The route label of a request path: the pattern of [`ROUTES`] it
/// matches, `other` for anything else.
pub fn route_label(path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES
        .iter()
        .find(|pattern| {
            let want: Vec<&str> = pattern.split('/').collect();
            want.len() == parts.len()
                && want
                    .iter()
                    .zip(&parts)
                    .all(|(w, p)| w == p || (w.starts_with('{') && !p.is_empty()))
        })
        .copied()
        .unwrap_or("other")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay meaningful after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// A request started.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// A request ended with `outcome` (`ok` or an error code).
    pub fn finish(&self, route: &'static str, outcome: &'static str, took: Duration) {
        *lock(&self.requests).entry((route, outcome)).or_default() += 1;
        let mut d = lock(&self.durations);
        let h = d.entry(route).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        let secs = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// The exposition text.
    pub fn render(&self, operations_in_flight: u64, budget: Option<&MemoryBudget>) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP luks_agent_requests_total API requests by route and outcome (ok or error code).\n\
             # TYPE luks_agent_requests_total counter"
        );
        for ((route, outcome), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                s,
                "luks_agent_requests_total{{route=\"{route}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP luks_agent_request_duration_seconds Time from request to answer.\n\
             # TYPE luks_agent_request_duration_seconds histogram"
        );
        for (route, h) in lock(&self.durations).iter() {
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    s,
                    "luks_agent_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                s,
                "luks_agent_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                 luks_agent_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                 luks_agent_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            s,
            "# HELP luks_agent_requests_in_flight API requests being served.\n\
             # TYPE luks_agent_requests_in_flight gauge\n\
             luks_agent_requests_in_flight {}\n\
             # HELP luks_agent_operations_in_flight Volume operations running (they always finish).\n\
             # TYPE luks_agent_operations_in_flight gauge\n\
             luks_agent_operations_in_flight {operations_in_flight}",
            self.in_flight.load(Ordering::Relaxed)
        );
        if let Some(b) = budget {
            let _ = writeln!(
                s,
                "# HELP luks_agent_kdf_memory_budget_kib Memory Argon2 runs may use together.\n\
                 # TYPE luks_agent_kdf_memory_budget_kib gauge\n\
                 luks_agent_kdf_memory_budget_kib {}\n\
                 # HELP luks_agent_kdf_memory_in_use_kib Memory held by running Argon2 runs.\n\
                 # TYPE luks_agent_kdf_memory_in_use_kib gauge\n\
                 luks_agent_kdf_memory_in_use_kib {}\n\
                 # HELP luks_agent_kdf_waiting Key derivations waiting for memory.\n\
                 # TYPE luks_agent_kdf_waiting gauge\n\
                 luks_agent_kdf_waiting {}",
                b.total_kib(),
                b.in_use_kib(),
                b.waiting()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_patterns_not_ids() {
        assert_eq!(
            route_label("/v1/volumes/abc/attach"),
            "/v1/volumes/{id}/attach"
        );
        assert_eq!(route_label("/v1/volumes/abc"), "/v1/volumes/{id}");
        assert_eq!(route_label("/v1/volumes/"), "/v1/volumes");
        assert_eq!(route_label("/etc/passwd"), "other");
    }

    #[test]
    fn render_counts_and_buckets() {
        let m = Metrics::default();
        let served = m.start();
        m.finish("/healthz", "ok", Duration::from_millis(3));
        drop(served);
        let _serving = m.start();
        // A request whose connection went away before the answer.
        drop(m.start());
        let text = m.render(0, Some(&MemoryBudget::new(1024)));
        assert!(text.contains("luks_agent_requests_total{route=\"/healthz\",outcome=\"ok\"} 1"));
        assert!(text.contains(
            "luks_agent_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "luks_agent_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.001\"} 0"
        ));
        assert!(text.contains("luks_agent_requests_in_flight 1"));
        assert!(text.contains("luks_agent_kdf_memory_budget_kib 1024"));
    }
}
