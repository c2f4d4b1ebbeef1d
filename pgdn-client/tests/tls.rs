//! pgdn-client over `https://` and `wss://` against a real pgdn server
//! terminating TLS on port 0, with a CA made at test time (pgdn-testkit's
//! `TestCa`). Run with whichever TLS feature is on: `rustls` by default,
//! and `cargo xtask test` runs it once more with only `native-tls`.

#![cfg(any(feature = "rustls", feature = "native-tls"))]

use std::time::Duration;

use futures_util::StreamExt;
use pgdn_client::{Error, Event, Publisher, Subscriber, Subscription};
use pgdn_server::{JwtAuthenticator, Pgdn, TlsConfig};
use pgdn_testkit::TestCa;
use serde_json::json;
use tokio::net::TcpListener;

const SECRET: &[u8] = b"client-tls-secret-of-at-least-32-bytes";
const KEY: &str = "client-tls-publish-key";
const WAIT: Duration = Duration::from_secs(15);

/// A server over TLS with `ca`'s certificate; its `host:port`.
async fn serve_tls(ca: &TestCa) -> (String, tokio::sync::oneshot::Sender<()>) {
    let pgdn = Pgdn::builder()
        .jwt_secret(SECRET)
        .publish_key(KEY)
        .build()
        .unwrap();
    let tls = TlsConfig::from_pem(ca.cert_pem.as_bytes(), ca.key_pem.as_bytes()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pgdn.serve_tls(listener, tls, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn token(user: &str) -> String {
    JwtAuthenticator::new(SECRET)
        .issue(user, &[], Duration::from_secs(600))
        .unwrap()
}

async fn next_event(sub: &mut Subscription) -> Event {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
        .expect("no error")
}

#[tokio::test]
async fn publishes_over_https_and_subscribes_over_wss_with_a_private_ca() {
    let ca = TestCa::generate();
    let (addr, _stop) = serve_tls(&ca).await;

    let mut sub = Subscriber::new(format!("wss://{addr}/ws"), token("u1"))
        .root_certificate(&ca.ca_pem)
        .subscribe()
        .unwrap();
    assert!(matches!(
        next_event(&mut sub).await,
        Event::Connected { .. }
    ));

    let publisher = Publisher::builder(format!("https://{addr}"), KEY)
        .root_certificate(&ca.ca_pem)
        .build()
        .unwrap();
    let receipt = publisher
        .notify_user("u1", "info", json!({"via": "https"}))
        .await
        .unwrap();
    assert_eq!(receipt.delivered, Some(1));
    let Event::Notification(n) = next_event(&mut sub).await else {
        panic!("expected the notification");
    };
    assert_eq!(n.id, receipt.id);

    #[cfg(feature = "blocking")]
    {
        let url = format!("https://{addr}");
        let ca_pem = ca.ca_pem.clone();
        let receipt = tokio::task::spawn_blocking(move || {
            let builder = Publisher::builder(url, KEY).root_certificate(ca_pem);
            pgdn_client::blocking::Publisher::from_builder(builder)
                .unwrap()
                .notify_user("u1", "info", json!({"via": "blocking https"}))
                .unwrap()
        })
        .await
        .unwrap();
        let Event::Notification(n) = next_event(&mut sub).await else {
            panic!("expected the notification");
        };
        assert_eq!(n.id, receipt.id);
    }
}

#[tokio::test]
async fn without_the_ca_the_server_is_not_trusted() {
    let ca = TestCa::generate();
    let (addr, _stop) = serve_tls(&ca).await;
    let publisher = Publisher::builder(format!("https://{addr}"), KEY)
        .retry_deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(matches!(
        publisher.stats().await,
        Err(Error::Unavailable { .. })
    ));
    let mut sub = Subscriber::new(format!("wss://{addr}/ws"), token("u1"))
        .subscribe()
        .unwrap();
    match next_event(&mut sub).await {
        Event::Disconnected { reason, .. } => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[test]
fn an_unreadable_root_certificate_fails_the_build() {
    let err = Publisher::builder("https://127.0.0.1:1", KEY)
        .root_certificate("not a certificate")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    let err = Subscriber::new("wss://127.0.0.1:1/ws", "t")
        .root_certificate("not a certificate")
        .subscribe()
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
}
