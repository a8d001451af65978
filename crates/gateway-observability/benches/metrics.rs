//! What the metrics observer costs a finished request: a streamed chat with usage, and the
//! same from eight threads at once (the counters are shared by every connection).

#![allow(
    clippy::unwrap_used,
    reason = "a bench that cannot set up should fail at once"
)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use gateway_core::openai::Usage;
use gateway_core::{
    FinishedRequest, Principal, RequestContext, RequestId, RequestObserver, RequestOutcome,
};
use gateway_observability::RequestMetrics;
use std::sync::Arc;
use std::time::Duration;

fn streamed_chat(alias: &str) -> RequestOutcome {
    RequestOutcome {
        principal: Some(Principal {
            project: "team-a".into(),
            key_id: "k".into(),
            allowed_models: None,
            tags: Arc::default(),
            tags_json: "{}".into(),
            project_rate_limit: None,
            key_rate_limit: None,
        }),
        routed: true,
        alias: Some(alias.into()),
        provider: Some("openai".into()),
        upstream_model: Some("gpt".into()),
        attempts: 1,
        streamed: true,
        usage: Some(Usage::new(120, 40)),
        time_to_first_token: Some(Duration::from_millis(180)),
        ..RequestOutcome::default()
    }
}

fn bench(c: &mut Criterion) {
    let metrics = Arc::new(RequestMetrics::new());
    let aliases: Vec<String> = (0..50).map(|i| format!("alias-{i}")).collect();
    metrics.set_aliases(aliases.iter().map(String::as_str));
    let context = RequestContext::new(RequestId::new_v7(), http::Method::POST, "/".into());
    let outcome = streamed_chat("alias-7");
    let finished = FinishedRequest {
        context: &context,
        outcome: &outcome,
        status: http::StatusCode::OK,
        elapsed: Duration::from_millis(900),
        client_aborted: false,
    };
    c.bench_function("request_finished", |b| {
        b.iter(|| metrics.request_finished(black_box(&finished)));
    });
    c.bench_function("request_finished_8_threads", |b| {
        b.iter_custom(|iterations| {
            let per_thread = iterations.div_ceil(8);
            let start = std::time::Instant::now();
            std::thread::scope(|scope| {
                for thread in 0..8 {
                    let metrics = metrics.clone();
                    let alias = format!("alias-{thread}");
                    scope.spawn(move || {
                        let context = RequestContext::new(
                            RequestId::new_v7(),
                            http::Method::POST,
                            "/".into(),
                        );
                        let outcome = streamed_chat(&alias);
                        let finished = FinishedRequest {
                            context: &context,
                            outcome: &outcome,
                            status: http::StatusCode::OK,
                            elapsed: Duration::from_millis(900),
                            client_aborted: false,
                        };
                        for _ in 0..per_thread {
                            metrics.request_finished(black_box(&finished));
                        }
                    });
                }
            });
            // Wall time for all of them: per request, the throughput cost under contention.
            start.elapsed()
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
