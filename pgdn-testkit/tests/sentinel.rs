//! A real Redis Sentinel setup: the replica replaces a killed master, and a
//! paused one.

use std::time::{Duration, Instant};

use pgdn_testkit::{DEFAULT_MASTER_NAME, RedisSentinel, redis_cli};

#[test]
fn starts_and_fails_over_a_killed_master() {
    let t0 = Instant::now();
    let mut setup = RedisSentinel::start();
    let started = t0.elapsed();
    assert_eq!(setup.master_name(), DEFAULT_MASTER_NAME);
    assert_eq!(setup.sentinel_urls().len(), 3);
    assert_eq!(
        setup.master_url(),
        format!("redis://127.0.0.1:{}", setup.master_port())
    );
    for port in setup.sentinel_ports() {
        let addr = redis_cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]);
        assert_eq!(addr, format!("127.0.0.1\n{}", setup.master_port()));
    }
    // Written on the master, replicated.
    assert_eq!(
        redis_cli(setup.master_port(), &["SET", "pgdn:key", "v1"]),
        "OK"
    );
    // (Not WAIT: it counts acknowledgements of its own connection's
    // writes, and each redis_cli is a new connection.)
    eventually(5, "the replica has the key", || {
        redis_cli(setup.replica_port(), &["GET", "pgdn:key"]) == "v1"
    });

    let t1 = Instant::now();
    setup.kill_master();
    let new = setup.wait_failover(Duration::from_secs(20));
    let failed_over = t1.elapsed();
    assert_eq!(new, setup.replica_port());
    assert_eq!(redis_cli(new, &["GET", "pgdn:key"]), "v1");
    assert_eq!(redis_cli(new, &["SET", "pgdn:key", "v2"]), "OK");
    eprintln!("sentinel setup started in {started:?}, failed over in {failed_over:?}");
}

#[test]
fn fails_over_a_paused_master_under_another_name() {
    let setup = RedisSentinel::start_named("pgdn");
    assert_eq!(setup.master_name(), "pgdn");
    setup.pause_master();
    let new = setup.wait_failover(Duration::from_secs(20));
    assert_eq!(new, setup.replica_port());
    setup.resume_master();
    // The sentinels make the old master a replica of the new one.
    let replica_of_new = format!("slave\n127.0.0.1\n{new}\n");
    eventually(
        10,
        "the old master becomes a replica of the new one",
        || redis_cli(setup.master_port(), &["ROLE"]).starts_with(&replica_of_new),
    );
}

/// Polls `check` every 50 ms for up to `secs` seconds.
fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
