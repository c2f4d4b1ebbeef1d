//! `/metrics` over the wire: the publish request duration and
//! publish-to-write latency histograms, connections by transport, build
//! info, readiness and the process's own numbers.

use futures_util::StreamExt;
use serde_json::json;

use super::common::*;

/// The value of the sample `name` (labels included, exactly as written).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Reads an SSE body until its text contains `needle`.
async fn read_until(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn histograms_transports_build_and_process_after_a_delivery() {
    let s = TestServer::start().await;
    let before = s.metrics().await;
    assert_eq!(
        sample(&before, r#"pgdn_connections{transport="websocket"}"#),
        0.0
    );
    assert!(!before.contains("pgdn_publish_request_duration_seconds_count"));

    // One WebSocket and one SSE connection of the same user.
    let mut ws = s.connect("u1", &[]).await;
    let res = s
        .http
        .get(s.url(&format!("/sse?token={}", s.token("u1", &[]))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = res.bytes_stream();
    let mut seen = String::new();
    read_until(&mut sse, &mut seen, r#""type":"connection""#).await;

    let reply = s
        .publish(json!({"target":{"user":"u1"},"type":"info","payload":{"n":1}}))
        .await;
    assert_eq!(reply["delivered"], 2, "{reply}");
    assert_eq!(ws.next().await["payload"]["n"], 1);
    read_until(&mut sse, &mut seen, r#""n":1"#).await;
    // The session times a batch right after writing it, before it reads
    // the next client frame: once the pong is back, the sample is in.
    ws.roundtrip("after").await;

    let m = s.metrics().await;
    let count = |name: &str| sample(&m, name);
    assert_eq!(
        count(r#"pgdn_publish_request_duration_seconds_count{endpoint="publish",outcome="ok"}"#),
        1.0,
        "{m}"
    );
    assert!(count("pgdn_publish_to_write_seconds_count") >= 1.0, "{m}");
    assert!(count(r#"pgdn_publish_to_write_seconds_bucket{le="+Inf"}"#) >= 1.0);
    assert!(count("pgdn_publish_to_write_seconds_sum") > 0.0, "{m}");
    assert_eq!(count(r#"pgdn_connections{transport="websocket"}"#), 1.0);
    assert_eq!(count(r#"pgdn_connections{transport="sse"}"#), 1.0);
    assert_eq!(
        count(r#"pgdn_connections_opened_total{transport="websocket"}"#),
        1.0
    );
    assert_eq!(
        count(r#"pgdn_connections_opened_total{transport="sse"}"#),
        1.0
    );
    assert_eq!(count("pgdn_ready"), 1.0);
    assert_eq!(count("pgdn_broker_ready"), 1.0);
    assert!(
        m.contains(&format!(
            r#"pgdn_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    // This test process is the server: its numbers are plausible.
    assert!(count("process_resident_memory_bytes") > 1e6, "{m}");
    assert!(count("process_open_fds") >= 3.0, "{m}");
    assert!(count("process_max_fds") >= count("process_open_fds"));
    assert!(count("process_cpu_seconds_total") >= 0.0, "{m}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = count("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 3600.0, "{started}");

    // A refused publish is timed too, under its outcome.
    let (status, _) = s.post("/api/v1/publish", Some("wrong-key"), "{}").await;
    assert_eq!(status, 401);
    let m = s.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"pgdn_publish_request_duration_seconds_count{endpoint="publish",outcome="unauthorized"}"#
        ),
        1.0
    );

    // Leaving: the gauges follow.
    drop(ws);
    drop(sse);
    s.wait_connections(0).await;
    let m = s.metrics().await;
    assert_eq!(
        sample(&m, r#"pgdn_connections{transport="websocket"}"#),
        0.0
    );
    assert_eq!(sample(&m, r#"pgdn_connections{transport="sse"}"#), 0.0);
    s.stop().await;
}
