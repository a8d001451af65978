//! The [`RoutingTable`]: validation of the `[[models]]` section, plans, and feedback.

use crate::config::{FailureClass, FailureClasses, ModelConfig, Sticky, Strategy};
use crate::state::{
    CANARY_SAMPLES, COOL_DOWN, CanaryLimits, CanaryWatch, Clock, FNV_OFFSET, Health, SystemClock,
    UNHEALTHY_AFTER, Upstream, fnv1a, mix, nanos, scale,
};
use gateway_core::config::ConfigError;
use http::HeaderMap;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Prices for `lowest-cost` aliases, owned by another crate.
pub trait CostLookup: Send + Sync {
    /// The price of a provider's model in any unit that is the same for every target (e.g.
    /// micro-USD per million tokens); `None` when unknown.
    fn cost(&self, provider: &str, model: &str) -> Option<u64>;
}

/// No prices at all: a table built with it rejects `lowest-cost` aliases.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPrices;

impl CostLookup for NoPrices {
    fn cost(&self, _provider: &str, _model: &str) -> Option<u64> {
        None
    }
}

/// What a plan may use to keep a caller on one target.
#[derive(Debug, Clone, Copy)]
pub struct RouteInputs<'a> {
    pub key_id: &'a str,
    pub user: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The policy layer's circuit breakers: a target whose upstream's breaker is open is
    /// treated like an unhealthy one (tried last, after every usable target).
    pub open_circuits: Option<&'a dyn gateway_core::UpstreamHealth>,
}

impl<'a> RouteInputs<'a> {
    fn identity(&self, sticky: &Sticky) -> Option<&'a [u8]> {
        let bytes = match sticky {
            Sticky::Key => Some(self.key_id.as_bytes()),
            Sticky::User => self.user.map(str::as_bytes),
            Sticky::Header(name) => self.headers.get(name).map(http::HeaderValue::as_bytes),
        };
        bytes.filter(|bytes| !bytes.is_empty())
    }
}

/// How an attempt ended, as told to [`RoutingTable::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success { ttft: Duration, latency: Duration },
    Failure { class: FailureClass },
}

/// Counters for a metrics exporter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoutingStats {
    /// Canary targets rolled back since this table was built.
    pub canary_rollbacks: u64,
    /// Times an upstream was set aside after consecutive failures.
    pub health_ejections: u64,
    /// Upstreams (distinct provider + model) set aside right now.
    pub unhealthy_upstreams: u64,
}

/// Table-wide state every target reaches.
#[derive(Debug)]
struct Shared {
    clock: Arc<dyn Clock>,
    epoch: Instant,
    canary_rollbacks: AtomicU64,
    health_ejections: AtomicU64,
}

impl Shared {
    /// Nanoseconds since the table was built, plus one, so 0 can mean "never" in the atomics.
    fn now(&self) -> u64 {
        nanos(self.clock.now().saturating_duration_since(self.epoch)).saturating_add(1)
    }
}

/// Reads the clock at most once per plan, and only if some target's health needs it.
struct LazyNow<'a> {
    shared: &'a Shared,
    now: Cell<u64>,
}

impl LazyNow<'_> {
    fn get(&self) -> u64 {
        if self.now.get() == 0 {
            self.now.set(self.shared.now());
        }
        self.now.get()
    }
}

/// One target of one alias, with the runtime state it reads and feeds.
#[derive(Debug)]
pub struct Target {
    pub alias: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub weight: u32,
    pub canary: bool,
    fallback_on: FailureClasses,
    /// Position in the alias's config, the tie-breaker of every order.
    position: u32,
    /// Same for every target with this provider + model: plans dedupe on it.
    upstream_id: u32,
    upstream: Arc<Upstream>,
    cost: u64,
    rolled_back: AtomicBool,
    /// The alias's canary windows, and this target's ring in them if it is a canary.
    watch: Option<(Arc<CanaryWatch>, Option<usize>)>,
    shared: Arc<Shared>,
}

impl Target {
    pub fn fallback_on(&self) -> FailureClasses {
        self.fallback_on
    }

    /// A rolled-back canary has weight 0 for the rest of this table's life.
    pub fn is_rolled_back(&self) -> bool {
        self.rolled_back.load(Ordering::Relaxed)
    }

    fn report(&self, outcome: Outcome) {
        let latency = match outcome {
            Outcome::Success { ttft, latency } => {
                self.upstream.succeeded(ttft);
                Some(latency)
            }
            Outcome::Failure { class } if class.is_recoverable() => {
                if self.upstream.failed(self.shared.now()) {
                    self.shared.health_ejections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        provider = &*self.provider,
                        model = &*self.model,
                        failures = UNHEALTHY_AFTER,
                        cool_down_secs = COOL_DOWN.as_secs(),
                        "upstream set aside after consecutive failures"
                    );
                }
                None
            }
            // The request was at fault: that says nothing about the target.
            Outcome::Failure { .. } => return,
        };
        let Some((watch, slot)) = &self.watch else {
            return;
        };
        let now = self.shared.now();
        let Some(slot) = *slot else {
            watch.record_other(now, latency);
            return;
        };
        if self.is_rolled_back() {
            return;
        }
        let Some(verdict) = watch.record_canary(slot, now, latency) else {
            return;
        };
        if self.rolled_back.swap(true, Ordering::Relaxed) {
            return;
        }
        self.shared.canary_rollbacks.fetch_add(1, Ordering::Relaxed);
        let millis = |value: Option<u64>| value.map_or(f64::NAN, |v| v as f64 / 1e6);
        tracing::warn!(
            alias = &*self.alias,
            provider = &*self.provider,
            model = &*self.model,
            requests = verdict.requests,
            error_rate = verdict.error_rate,
            p95_ms = millis(verdict.p95),
            others_p95_ms = millis(verdict.others_p95),
            max_error_rate = watch.limits.max_error_rate,
            max_p95_ratio = watch.limits.max_p95_ratio,
            "canary rolled back"
        );
    }
}

/// One try in a [`RoutePlan`]: a cheap handle on a target (one reference count).
#[derive(Debug, Clone)]
pub struct Attempt {
    target: Arc<Target>,
    /// Sort key while the plan is built: (unhealthy, strategy metric, config position).
    rank: (u8, u64, u32),
}

impl Attempt {
    pub fn alias(&self) -> &Arc<str> {
        &self.target.alias
    }

    pub fn provider(&self) -> &Arc<str> {
        &self.target.provider
    }

    pub fn model(&self) -> &Arc<str> {
        &self.target.model
    }

    /// The failure classes after which the alias this attempt belongs to moves on.
    pub fn fallback_on(&self) -> FailureClasses {
        self.target.fallback_on
    }

    /// Whether a failure of this class may go on to the next attempt.
    pub fn may_continue(&self, class: FailureClass) -> bool {
        self.target.fallback_on.contains(class)
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

/// The ordered attempts for one request.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    attempts: Vec<Attempt>,
}

impl RoutePlan {
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    pub fn first(&self) -> Option<&Attempt> {
        self.attempts.first()
    }

    pub fn len(&self) -> usize {
        self.attempts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Attempt> {
        self.attempts.iter()
    }
}

impl IntoIterator for RoutePlan {
    type Item = Attempt;
    type IntoIter = std::vec::IntoIter<Attempt>;

    fn into_iter(self) -> Self::IntoIter {
        self.attempts.into_iter()
    }
}

impl<'a> IntoIterator for &'a RoutePlan {
    type Item = &'a Attempt;
    type IntoIter = std::slice::Iter<'a, Attempt>;

    fn into_iter(self) -> Self::IntoIter {
        self.attempts.iter()
    }
}

/// An alias with its targets and its fallback chain.
#[derive(Debug)]
pub struct Route {
    pub alias: Arc<str>,
    strategy: Strategy,
    sticky: Option<Sticky>,
    /// FNV-1a state after the alias, so one caller's variants are independent across aliases.
    sticky_seed: u64,
    targets: Vec<Arc<Target>>,
    /// Indices of the transitive fallbacks, depth first, without repeats or this route.
    chain: Vec<usize>,
    /// Targets of this route and its chain: the most attempts a plan can hold.
    capacity: usize,
    /// A non-canary target with a positive weight (validation guarantees one), the answer of
    /// [`Route::pick`] when nothing else is usable.
    primary: Arc<Target>,
    rate_limit: Option<gateway_core::RateLimit>,
    shared: Arc<Shared>,
}

impl Route {
    /// The alias's own `rate_limit`, shared by every caller.
    pub fn rate_limit(&self) -> Option<gateway_core::RateLimit> {
        self.rate_limit
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// The strategy's first choice for a caller without identity (no stickiness, no fallbacks).
    pub fn pick(&self) -> Arc<Target> {
        let now = LazyNow {
            shared: &self.shared,
            now: Cell::new(0),
        };
        let mut attempts = Vec::with_capacity(self.targets.len());
        self.append(&mut attempts, None, &now);
        attempts
            .into_iter()
            .next()
            .map_or_else(|| self.primary.clone(), |attempt| attempt.target)
    }

    /// Appends this alias's usable targets, in strategy order, that the plan does not hold yet.
    fn append(
        &self,
        attempts: &mut Vec<Attempt>,
        inputs: Option<&RouteInputs<'_>>,
        now: &LazyNow<'_>,
    ) {
        let start = attempts.len();
        for target in &self.targets {
            if target.weight == 0 || target.is_rolled_back() {
                continue;
            }
            if attempts[..start]
                .iter()
                .any(|attempt| attempt.target.upstream_id == target.upstream_id)
            {
                continue;
            }
            let (mut unhealthy, failed_at) = match target.upstream.health(|| now.get()) {
                Health::Healthy => (0, 0),
                Health::Unhealthy(at) => (1, at),
            };
            if inputs
                .and_then(|inputs| inputs.open_circuits)
                .is_some_and(|circuits| circuits.is_open(&target.provider))
            {
                unhealthy = 1;
            }
            let metric = match self.strategy {
                Strategy::Weighted => u64::from(u32::MAX - target.weight),
                Strategy::Priority => failed_at,
                // Unmeasured targets rank 0, ahead of every measurement, so they get one.
                Strategy::LeastLatency => target
                    .upstream
                    .ewma_ttft()
                    .map_or(0, |ewma| ewma.saturating_add(1)),
                Strategy::LowestCost => target.cost,
            };
            attempts.push(Attempt {
                target: target.clone(),
                rank: (unhealthy, metric, target.position),
            });
        }
        let segment = &mut attempts[start..];
        segment.sort_unstable_by_key(|attempt| attempt.rank);
        let healthy = segment.iter().take_while(|a| a.rank.0 == 0).count();
        match self.strategy {
            Strategy::Priority if healthy > 0 => attempts.truncate(start + healthy),
            Strategy::Weighted => {
                let pool = if healthy == 0 { segment.len() } else { healthy };
                let point = self
                    .sticky
                    .as_ref()
                    .zip(inputs)
                    .and_then(|(sticky, inputs)| inputs.identity(sticky))
                    .map(|identity| mix(fnv1a(self.sticky_seed, identity)));
                if let Some(chosen) = choose_weighted(&segment[..pool], point) {
                    segment[..=chosen].rotate_right(1);
                }
            }
            _ => {}
        }
    }
}

/// The index of the attempt owning a point of the cumulative weight line: the sticky hash
/// scaled onto it, or a random point.
fn choose_weighted(pool: &[Attempt], hash: Option<u64>) -> Option<usize> {
    let total: u64 = pool.iter().map(|a| u64::from(a.target.weight)).sum();
    if total == 0 {
        return None;
    }
    let point = hash.map_or_else(|| fastrand::u64(0..total), |hash| scale(hash, total));
    let mut end = 0;
    pool.iter().position(|attempt| {
        end += u64::from(attempt.target.weight);
        point < end
    })
}

/// Every alias of one config version, with what it learnt since it was built.
#[derive(Debug)]
pub struct RoutingTable {
    routes: Vec<Route>,
    index: HashMap<Arc<str>, usize>,
    upstreams: Vec<Arc<Upstream>>,
    shared: Arc<Shared>,
}

impl RoutingTable {
    /// Builds the table without prices (a `lowest-cost` alias is then an error) on the system
    /// clock, reporting every problem with its config path.
    pub fn build(
        models: &[ModelConfig],
        providers: &HashSet<&str>,
    ) -> Result<Self, Vec<ConfigError>> {
        Self::build_with(models, providers, &NoPrices, Arc::new(SystemClock))
    }

    /// Builds the table with prices for `lowest-cost` aliases and the clock health and canary
    /// windows are timed with.
    pub fn build_with(
        models: &[ModelConfig],
        providers: &HashSet<&str>,
        costs: &dyn CostLookup,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut first_index: HashMap<&str, usize> = HashMap::with_capacity(models.len());
        for (index, model) in models.iter().enumerate() {
            if !model.alias.is_empty() && first_index.contains_key(model.alias.as_str()) {
                errors.push(ConfigError::new(
                    format!("models[{index}].alias"),
                    format!("duplicate alias `{}`", model.alias),
                ));
            } else {
                first_index.insert(model.alias.as_str(), index);
            }
        }
        let mut costs_found = vec![Vec::new(); models.len()];
        let mut graph = vec![Vec::new(); models.len()];
        for (index, model) in models.iter().enumerate() {
            costs_found[index] = validate_model(index, model, providers, costs, &mut errors);
            graph[index] = validate_fallbacks(index, model, &first_index, &mut errors);
        }
        find_cycles(models, &graph, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }

        let epoch = clock.now();
        let shared = Arc::new(Shared {
            clock,
            epoch,
            canary_rollbacks: AtomicU64::new(0),
            health_ejections: AtomicU64::new(0),
        });
        let mut upstream_ids: HashMap<(&str, &str), u32> = HashMap::new();
        let mut upstreams = Vec::new();
        let mut routes = Vec::with_capacity(models.len());
        for (index, model) in models.iter().enumerate() {
            let alias: Arc<str> = model.alias.as_str().into();
            let fallback_on: FailureClasses = model.fallback_on.iter().copied().collect();
            let canaries = model.targets.iter().filter(|t| t.canary).count();
            let watch = (canaries > 0).then(|| {
                let config = model.canary.unwrap_or_default();
                Arc::new(CanaryWatch::new(
                    CanaryLimits {
                        max_error_rate: config.max_error_rate,
                        max_p95_ratio: config.max_p95_ratio,
                        window: nanos(Duration::from_secs(config.window_secs)),
                        min_requests: usize::try_from(config.min_requests).unwrap_or(usize::MAX),
                    },
                    canaries,
                ))
            });
            let mut canary_slot = 0;
            let mut targets = Vec::with_capacity(model.targets.len());
            for (position, target) in model.targets.iter().enumerate() {
                let key = (target.provider.as_str(), target.model.as_str());
                let upstream_id = *upstream_ids.entry(key).or_insert_with(|| {
                    upstreams.push(Arc::new(Upstream::new()));
                    u32::try_from(upstreams.len() - 1).unwrap_or(u32::MAX)
                });
                let upstream = upstreams
                    .get(upstream_id as usize)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Upstream::new()));
                let slot = target.canary.then(|| {
                    canary_slot += 1;
                    canary_slot - 1
                });
                targets.push(Arc::new(Target {
                    alias: alias.clone(),
                    provider: target.provider.as_str().into(),
                    model: target.model.as_str().into(),
                    weight: target.weight,
                    canary: target.canary,
                    fallback_on,
                    position: u32::try_from(position).unwrap_or(u32::MAX),
                    upstream_id,
                    upstream,
                    cost: costs_found
                        .get(index)
                        .and_then(|found| found.get(position))
                        .copied()
                        .unwrap_or(0),
                    rolled_back: AtomicBool::new(false),
                    watch: watch.as_ref().map(|watch| (watch.clone(), slot)),
                    shared: shared.clone(),
                }));
            }
            let Some(primary) = targets.iter().find(|t| !t.canary && t.weight > 0).cloned() else {
                // Validation rejects such an alias; this only keeps the build total.
                return Err(vec![ConfigError::new(
                    format!("models[{index}].targets"),
                    "needs a non-canary target with a weight above 0",
                )]);
            };
            routes.push(Route {
                alias,
                strategy: model.strategy,
                sticky: model.sticky.clone(),
                sticky_seed: fnv1a(fnv1a(FNV_OFFSET, model.alias.as_bytes()), &[0xff]),
                targets,
                chain: fallback_chain(index, &graph),
                capacity: 0,
                primary,
                rate_limit: model.rate_limit.filter(|limit| !limit.is_unlimited()),
                shared: shared.clone(),
            });
        }
        let sizes: Vec<usize> = routes.iter().map(|r| r.targets.len()).collect();
        for route in &mut routes {
            route.capacity = route.targets.len()
                + route
                    .chain
                    .iter()
                    .filter_map(|&i| sizes.get(i))
                    .sum::<usize>();
        }
        let index = routes
            .iter()
            .enumerate()
            .map(|(i, route)| (route.alias.clone(), i))
            .collect();
        Ok(Self {
            routes,
            index,
            upstreams,
            shared,
        })
    }

    /// The ordered attempts for one request to `alias`; `None` if the alias does not exist.
    pub fn plan(&self, alias: &str, inputs: &RouteInputs<'_>) -> Option<RoutePlan> {
        let route = self.resolve(alias)?;
        let now = LazyNow {
            shared: &self.shared,
            now: Cell::new(0),
        };
        let mut attempts = Vec::with_capacity(route.capacity);
        route.append(&mut attempts, Some(inputs), &now);
        for fallback in route.chain.iter().filter_map(|&i| self.routes.get(i)) {
            fallback.append(&mut attempts, Some(inputs), &now);
        }
        Some(RoutePlan { attempts })
    }

    /// Feeds an attempt's result back: health, latency average, canary window.
    pub fn report(&self, attempt: &Attempt, outcome: Outcome) {
        attempt.target.report(outcome);
    }

    pub fn stats(&self) -> RoutingStats {
        let now = self.shared.now();
        RoutingStats {
            canary_rollbacks: self.shared.canary_rollbacks.load(Ordering::Relaxed),
            health_ejections: self.shared.health_ejections.load(Ordering::Relaxed),
            unhealthy_upstreams: self
                .upstreams
                .iter()
                .filter(|upstream| upstream.is_set_aside(now))
                .count() as u64,
        }
    }

    pub fn resolve(&self, alias: &str) -> Option<&Route> {
        self.index.get(alias).and_then(|&i| self.routes.get(i))
    }

    /// Aliases in config order, for `GET /v1/models`.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|route| &*route.alias)
    }

    pub fn contains(&self, alias: &str) -> bool {
        self.index.contains_key(alias)
    }
}

/// Checks one alias on its own; returns the targets' prices (0 where unused).
fn validate_model(
    index: usize,
    model: &ModelConfig,
    providers: &HashSet<&str>,
    costs: &dyn CostLookup,
    errors: &mut Vec<ConfigError>,
) -> Vec<u64> {
    let path = format!("models[{index}]");
    if model.alias.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.alias"),
            "must not be empty",
        ));
    }
    if model.targets.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.targets"),
            "an alias needs at least one target",
        ));
    }
    let mut seen = HashSet::new();
    let mut prices = Vec::with_capacity(model.targets.len());
    for (position, target) in model.targets.iter().enumerate() {
        let target_path = format!("{path}.targets[{position}]");
        if !providers.contains(target.provider.as_str()) {
            errors.push(ConfigError::new(
                format!("{target_path}.provider"),
                format!("no provider named `{}`", target.provider),
            ));
        }
        if target.model.is_empty() {
            errors.push(ConfigError::new(
                format!("{target_path}.model"),
                "must not be empty",
            ));
        }
        if !seen.insert((target.provider.as_str(), target.model.as_str())) {
            errors.push(ConfigError::new(
                target_path.clone(),
                format!(
                    "`{}` model `{}` is listed twice in this alias",
                    target.provider, target.model
                ),
            ));
        }
        let price = if model.strategy == Strategy::LowestCost {
            costs.cost(&target.provider, &target.model).unwrap_or_else(|| {
                errors.push(ConfigError::new(
                    target_path,
                    format!(
                        "no price known for `{}` model `{}`: a lowest-cost alias needs one for every target",
                        target.provider, target.model
                    ),
                ));
                0
            })
        } else {
            0
        };
        prices.push(price);
    }
    if !model.targets.is_empty() && !model.targets.iter().any(|t| !t.canary && t.weight > 0) {
        errors.push(ConfigError::new(
            format!("{path}.targets"),
            "at least one non-canary target needs a weight above 0",
        ));
    }
    if model.sticky.is_some() && model.strategy != Strategy::Weighted {
        errors.push(ConfigError::new(
            format!("{path}.sticky"),
            "only a weighted alias can be sticky",
        ));
    }
    for (position, class) in model.fallback_on.iter().enumerate() {
        if !class.is_recoverable() {
            errors.push(ConfigError::new(
                format!("{path}.fallback_on[{position}]"),
                "client errors would fail on every target: only connect, timeout, rate_limit and server_error may fall back",
            ));
        }
    }
    if let Some(canary) = &model.canary {
        let canary_path = format!("{path}.canary");
        if !model.targets.iter().any(|t| t.canary) {
            errors.push(ConfigError::new(
                canary_path.clone(),
                "no target of this alias has `canary = true`",
            ));
        }
        if !(0.0..=1.0).contains(&canary.max_error_rate) {
            errors.push(ConfigError::new(
                format!("{canary_path}.max_error_rate"),
                "must be between 0 and 1",
            ));
        }
        if !(canary.max_p95_ratio.is_finite() && canary.max_p95_ratio > 0.0) {
            errors.push(ConfigError::new(
                format!("{canary_path}.max_p95_ratio"),
                "must be a positive number",
            ));
        }
        if canary.window_secs == 0 {
            errors.push(ConfigError::new(
                format!("{canary_path}.window_secs"),
                "must be at least 1",
            ));
        }
        if canary.min_requests == 0 || canary.min_requests as usize > CANARY_SAMPLES {
            errors.push(ConfigError::new(
                format!("{canary_path}.min_requests"),
                format!("must be between 1 and {CANARY_SAMPLES} (the samples kept per window)"),
            ));
        }
    }
    prices
}

/// Checks the names in `fallbacks`; returns the edges `(position in fallbacks, alias index)`.
fn validate_fallbacks(
    index: usize,
    model: &ModelConfig,
    first_index: &HashMap<&str, usize>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(usize, usize)> {
    let mut edges = Vec::with_capacity(model.fallbacks.len());
    for (position, name) in model.fallbacks.iter().enumerate() {
        let path = format!("models[{index}].fallbacks[{position}]");
        if *name == model.alias {
            errors.push(ConfigError::new(
                path,
                "an alias cannot fall back to itself",
            ));
        } else if model.fallbacks[..position].contains(name) {
            errors.push(ConfigError::new(path, format!("`{name}` is listed twice")));
        } else if let Some(&target) = first_index.get(name.as_str()) {
            edges.push((position, target));
        } else {
            errors.push(ConfigError::new(path, format!("no alias named `{name}`")));
        }
    }
    edges
}

/// Reports every fallback that closes a cycle, at the entry that closes it.
fn find_cycles(
    models: &[ModelConfig],
    graph: &[Vec<(usize, usize)>],
    errors: &mut Vec<ConfigError>,
) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: usize,
        models: &[ModelConfig],
        graph: &[Vec<(usize, usize)>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        errors: &mut Vec<ConfigError>,
    ) {
        if let Some(mark) = marks.get_mut(node) {
            *mark = Mark::OnPath;
        }
        path.push(node);
        for &(position, next) in graph.get(node).map_or(&[][..], Vec::as_slice) {
            match marks.get(next) {
                Some(Mark::New) => visit(next, models, graph, marks, path, errors),
                Some(Mark::OnPath) => {
                    let start = path.iter().position(|&n| n == next).unwrap_or(0);
                    let names: Vec<&str> = path[start..]
                        .iter()
                        .chain(std::iter::once(&next))
                        .filter_map(|&n| models.get(n).map(|m| m.alias.as_str()))
                        .collect();
                    errors.push(ConfigError::new(
                        format!("models[{node}].fallbacks[{position}]"),
                        format!("fallback cycle: {}", names.join(" -> ")),
                    ));
                }
                _ => {}
            }
        }
        path.pop();
        if let Some(mark) = marks.get_mut(node) {
            *mark = Mark::Done;
        }
    }
    let mut marks = vec![Mark::New; graph.len()];
    let mut path = Vec::new();
    for node in 0..graph.len() {
        if marks.get(node) == Some(&Mark::New) {
            visit(node, models, graph, &mut marks, &mut path, errors);
        }
    }
}

/// The transitive fallbacks of `start`, depth first (a fallback's own fallbacks come right
/// after it, before the next sibling), each once, never `start` itself.
fn fallback_chain(start: usize, graph: &[Vec<(usize, usize)>]) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut stack: Vec<usize> = graph
        .get(start)
        .map(|edges| edges.iter().rev().map(|&(_, next)| next).collect())
        .unwrap_or_default();
    while let Some(node) = stack.pop() {
        if node == start || chain.contains(&node) {
            continue;
        }
        chain.push(node);
        if let Some(edges) = graph.get(node) {
            stack.extend(edges.iter().rev().map(|&(_, next)| next));
        }
    }
    chain
}
