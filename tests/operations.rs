//! Operating ztfhook: `/metrics` counts what the bridge did, per destination
//! topic, with latency and hook-time histograms, lag and in-flight gauges;
//! `/healthz` answers 200 once partitions are assigned.

mod common;

use std::time::Duration;

use common::*;

const PULL: Duration = Duration::from_secs(120);

/// The value of one sample line of a Prometheus text page.
fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_per_destination_with_latency_hook_time_lag_and_reloads() {
    let s = services();
    let (topic, group) = (unique("metrics"), unique("group"));
    let (ps, bright) = (unique("main"), unique("bright"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    let mut main = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut fast = Inbox::open(
        &s.emulator,
        &create_pubsub_topic(&s.emulator, &bright).await,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fanout.rhai");
    // Odd offsets also go to a second topic.
    std::fs::write(
        &script,
        format!("fn route(msg) {{ if msg.offset % 2 == 1 {{ [\"@default\", \"{bright}\"] }} }}"),
    )
    .unwrap();
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.hook = vec![(
        "script".into(),
        format!("{:?}", script.display().to_string()),
    )];
    config
        .kafka_extra
        .push(("statistics.interval.ms".into(), "500".into()));
    let address = format!("127.0.0.1:{}", free_port());
    let text = format!("{}\n[metrics]\nlisten = \"{address}\"\n", config.render());
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts[..20], 2)).await;

    let mut bridge = Bridge::start_text(&text, &[]);
    assert_eq!(
        main.pull(20, PULL).await.len(),
        20,
        "log:\n{}",
        bridge.log_text()
    );
    assert_eq!(fast.pull(10, PULL).await.len(), 10);
    bridge.wait_for_log("totals consumed 20 published 20", Duration::from_secs(10));
    assert_eq!(http_get(&address, "/healthz"), (200, "ok\n".into()));
    std::thread::sleep(Duration::from_secs(1));
    let (status, page) = http_get(&address, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&page, "ztfhook_consumed_messages_total"), 20.0);
    let bytes: usize = alerts[..20].iter().map(Vec::len).sum();
    assert_eq!(sample(&page, "ztfhook_consumed_bytes_total"), bytes as f64);
    assert_eq!(
        sample(
            &page,
            &format!("ztfhook_published_messages_total{{topic=\"{ps}\"}}")
        ),
        20.0
    );
    assert_eq!(
        sample(
            &page,
            &format!("ztfhook_published_messages_total{{topic=\"{bright}\"}}")
        ),
        10.0
    );
    assert_eq!(sample(&page, "ztfhook_publish_latency_seconds_count"), 30.0);
    assert_eq!(sample(&page, "ztfhook_hook_seconds_count"), 20.0);
    assert!(sample(&page, "ztfhook_hook_seconds_sum") > 0.0);
    assert_eq!(sample(&page, "ztfhook_assigned_partitions"), 2.0);
    assert_eq!(sample(&page, "ztfhook_in_flight_messages"), 0.0);
    assert_eq!(sample(&page, "ztfhook_healthy"), 1.0);
    assert_eq!(sample(&page, "ztfhook_dropped_messages_total"), 0.0);
    for p in 0..2 {
        assert_eq!(
            sample(
                &page,
                &format!("ztfhook_consumer_lag_messages{{topic=\"{topic}\",partition=\"{p}\"}}")
            ),
            0.0
        );
    }

    // An edit counts as a reload; a broken one as rejected.
    std::fs::write(&script, "fn route(msg) { () }").unwrap();
    bridge.wait_for_log("reloaded", Duration::from_secs(10));
    std::fs::write(&script, "fn route(msg) { ").unwrap();
    bridge.wait_for_log("the reload is rejected", Duration::from_secs(10));
    let (_, page) = http_get(&address, "/metrics");
    assert_eq!(sample(&page, "ztfhook_script_reloads_total"), 1.0);
    assert_eq!(sample(&page, "ztfhook_script_reloads_rejected_total"), 1.0);
    assert_eq!(http_get(&address, "/nope").0, 404);
    assert_eq!(bridge.stop().code(), Some(0), "log:\n{}", bridge.log_text());
}
