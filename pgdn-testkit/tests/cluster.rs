//! A real Redis Cluster: 3 masters with 1 replica each, a key through
//! `redis-cli -c`, and the failover of a killed master.

use std::time::{Duration, Instant};

use pgdn_testkit::{CLUSTER_SLOT_COUNT, RedisCluster, redis_cli};

#[test]
fn starts_serves_every_slot_and_fails_over_a_killed_master() {
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start(3, 1);
    let started = t0.elapsed();
    assert_eq!(cluster.node_count(), 6);
    assert_eq!(cluster.urls().len(), 6);
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    assert_eq!(
        cluster.seed_url(),
        format!("redis://127.0.0.1:{}", masters[0])
    );
    for &port in &cluster.ports() {
        let info = redis_cli(port, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        assert!(
            info.contains("cluster_slots_assigned:16384"),
            "{port}: {info}"
        );
        assert!(info.contains("cluster_slots_ok:16384"), "{port}: {info}");
    }
    for &master in &masters {
        assert_eq!(
            cluster.replica_ports(master).len(),
            1,
            "replicas of {master}"
        );
    }
    for slot in [0, 5460, 5461, 10922, 10923, CLUSTER_SLOT_COUNT - 1] {
        assert!(masters.contains(&cluster.master_of_slot(slot)));
    }

    // A key written through one node, with redirections, is read through
    // another.
    let (first, last) = (cluster.ports()[0], cluster.ports()[5]);
    assert_eq!(redis_cli(first, &["-c", "SET", "pgdn:key", "v1"]), "OK");
    assert_eq!(redis_cli(last, &["-c", "GET", "pgdn:key"]), "v1");
    let slot: u16 = redis_cli(first, &["CLUSTER", "KEYSLOT", "pgdn:key"])
        .parse()
        .unwrap();

    // Kill the master of the key: its replica takes over its slots.
    let old = cluster.master_of_slot(slot);
    let replica = cluster.replica_ports(old)[0];
    let old_slots = cluster.slot_ranges(old);
    assert!(!old_slots.is_empty());
    let t1 = Instant::now();
    cluster.kill_master(old);
    let new = cluster.wait_failover(old, Duration::from_secs(15));
    let failed_over = t1.elapsed();
    assert_ne!(new, old);
    assert_eq!(new, replica, "the only replica of {old} is promoted");
    assert_eq!(cluster.master_of_slot(slot), new);
    let masters_after = cluster.master_ports();
    assert_eq!(masters_after.len(), 3, "masters: {masters_after:?}");
    assert!(masters_after.contains(&new) && !masters_after.contains(&old));
    assert_eq!(redis_cli(new, &["-c", "GET", "pgdn:key"]), "v1");
    assert_eq!(
        cluster.slot_ranges(new),
        old_slots,
        "{new} serves every slot of {old}"
    );
    assert!(cluster.slot_ranges(old).is_empty());
    eprintln!("cluster started in {started:?}, failed over in {failed_over:?}");
}

/// Polls `check` every 50 ms for up to `secs` seconds.
fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fails_over_a_paused_master_which_rejoins_as_a_replica() {
    let cluster = RedisCluster::start_with_node_timeout(3, 1, Duration::from_millis(800));
    assert_eq!(cluster.node_timeout(), Duration::from_millis(800));
    let old = cluster.master_ports()[1];
    let ranges = cluster.slot_ranges(old);
    cluster.pause(old);
    let new = cluster.wait_failover(old, Duration::from_secs(15));
    assert_eq!(cluster.slot_ranges(new), ranges);
    cluster.resume(old);
    eventually(
        10,
        "the old master becomes a replica of the new one",
        || cluster.replica_ports(new) == [old],
    );
    assert!(cluster.log(old).contains("Ready to accept connections"));
}

#[test]
#[should_panic(expected = "at least 3 masters")]
fn refuses_fewer_than_3_masters() {
    RedisCluster::start(2, 1);
}

#[test]
fn migrates_a_slot_with_its_keys() {
    let cluster = RedisCluster::start(3, 0);
    let seed = cluster.master_ports()[0];
    assert_eq!(redis_cli(seed, &["-c", "SET", "{7}:k", "v"]), "OK");
    let slot: u16 = redis_cli(seed, &["CLUSTER", "KEYSLOT", "{7}:k"])
        .parse()
        .unwrap();
    let from = cluster.master_of_slot(slot);
    let to = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != from)
        .unwrap();
    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.master_of_slot(slot), to);
    assert_eq!(redis_cli(to, &["GET", "{7}:k"]), "v", "the key moved along");
    assert!(
        redis_cli(from, &["GET", "{7}:k"]).starts_with("MOVED"),
        "the old master redirects"
    );
}
