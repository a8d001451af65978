//! Load shedding: caps on requests in flight, globally and per project.
//!
//! Past a cap the request is refused at once with a 503 and `Retry-After`, instead of joining
//! a queue that grows without bound while every queued caller times out anyway. A slot is
//! held from admission until the response (stream included) has ended.

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// `[policy.shed]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShedConfig {
    /// Requests in flight on this replica, all projects together; 0 = no cap. Default 10000.
    pub max_in_flight: usize,
    /// Requests in flight per project on this replica; 0 = no cap. Default 0.
    pub max_in_flight_per_project: usize,
    /// The `Retry-After` a shed request gets, in seconds. Default 1.
    pub retry_after_secs: u64,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 10_000,
            max_in_flight_per_project: 0,
            retry_after_secs: 1,
        }
    }
}

/// Which cap refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shed {
    Global { limit: usize },
    Project { project: Arc<str>, limit: usize },
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Global { limit } => write!(f, "{limit} requests in flight"),
            Self::Project { project, limit } => {
                write!(f, "{limit} requests in flight for project `{project}`")
            }
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShedStats {
    pub in_flight: usize,
    pub shed_global: u64,
    pub shed_project: u64,
}

/// The in-flight counters of one process. They outlive config versions, so a reload that
/// changes a cap applies to the requests already running.
#[derive(Debug, Default)]
pub struct InFlight {
    global: Arc<AtomicUsize>,
    projects: RwLock<HashMap<Arc<str>, Arc<AtomicUsize>>>,
    shed_global: AtomicU64,
    shed_project: AtomicU64,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct InFlightSlot {
    global: Arc<AtomicUsize>,
    project: Option<Arc<AtomicUsize>>,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.global.fetch_sub(1, Ordering::AcqRel);
        if let Some(project) = &self.project {
            project.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a slot for a request of `project`, or says which cap is full.
    pub fn try_enter(&self, project: &Arc<str>, config: &ShedConfig) -> Result<InFlightSlot, Shed> {
        if !take(&self.global, config.max_in_flight) {
            self.shed_global.fetch_add(1, Ordering::Relaxed);
            return Err(Shed::Global {
                limit: config.max_in_flight,
            });
        }
        let mut slot = InFlightSlot {
            global: self.global.clone(),
            project: None,
        };
        if config.max_in_flight_per_project == 0 {
            return Ok(slot);
        }
        let counter = self.project_counter(project);
        if !take(&counter, config.max_in_flight_per_project) {
            self.shed_project.fetch_add(1, Ordering::Relaxed);
            // `slot` drops here and gives the global slot back.
            return Err(Shed::Project {
                project: project.clone(),
                limit: config.max_in_flight_per_project,
            });
        }
        slot.project = Some(counter);
        Ok(slot)
    }

    pub fn stats(&self) -> ShedStats {
        ShedStats {
            in_flight: self.global.load(Ordering::Acquire),
            shed_global: self.shed_global.load(Ordering::Relaxed),
            shed_project: self.shed_project.load(Ordering::Relaxed),
        }
    }

    fn project_counter(&self, project: &Arc<str>) -> Arc<AtomicUsize> {
        if let Some(counter) = self
            .projects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(project)
        {
            return counter.clone();
        }
        self.projects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(project.clone())
            .or_default()
            .clone()
    }
}

/// Increments `counter` unless it is at `limit` (0 = no limit).
fn take(counter: &AtomicUsize, limit: usize) -> bool {
    if limit == 0 {
        counter.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current < limit).then_some(current + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(global: usize, project: usize) -> ShedConfig {
        ShedConfig {
            max_in_flight: global,
            max_in_flight_per_project: project,
            retry_after_secs: 1,
        }
    }

    #[test]
    fn global_cap_sheds_and_frees_on_drop() {
        let in_flight = InFlight::new();
        let project: Arc<str> = "p".into();
        let config = config(2, 0);
        let first = in_flight.try_enter(&project, &config).unwrap();
        let _second = in_flight.try_enter(&project, &config).unwrap();
        assert_eq!(
            in_flight.try_enter(&project, &config).unwrap_err(),
            Shed::Global { limit: 2 }
        );
        drop(first);
        assert!(in_flight.try_enter(&project, &config).is_ok());
        assert_eq!(in_flight.stats().shed_global, 1);
    }

    #[test]
    fn project_cap_is_per_project_and_returns_the_global_slot() {
        let in_flight = InFlight::new();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let config = config(10, 1);
        let held = in_flight.try_enter(&a, &config).unwrap();
        assert!(matches!(
            in_flight.try_enter(&a, &config),
            Err(Shed::Project { .. })
        ));
        // The refused request did not keep a global slot.
        assert_eq!(in_flight.stats().in_flight, 1);
        let _other = in_flight.try_enter(&b, &config).unwrap();
        drop(held);
        assert!(in_flight.try_enter(&a, &config).is_ok());
        assert_eq!(in_flight.stats().shed_project, 1);
    }

    #[test]
    fn zero_means_no_cap() {
        let in_flight = InFlight::new();
        let project: Arc<str> = "p".into();
        let slots: Vec<_> = (0..1000)
            .map(|_| in_flight.try_enter(&project, &config(0, 0)).unwrap())
            .collect();
        assert_eq!(in_flight.stats().in_flight, 1000);
        drop(slots);
        assert_eq!(in_flight.stats().in_flight, 0);
    }
}
