use std::time::Duration;

use super::*;

const EXAMPLE: &str = include_str!("../../../ops/deploy/proxy.toml");

#[test]
fn example_parses_validates_and_equals_the_defaults() {
    let cfg = ProxyConfig::from_toml(EXAMPLE).expect("example parses");
    cfg.validate().expect("example validates");
    let c = &cfg.clusters[0];
    let defaults = ClusterConfig {
        name: "users".into(),
        service: "users".into(),
        ..ClusterConfig::default()
    };
    assert_eq!(c, &defaults, "example.toml must show the defaults");
    assert_eq!(cfg.listeners, vec![ListenerConfig::default()]);
    assert_eq!(cfg.routes[0].timeout, Duration::from_secs(15));
}

#[test]
fn membership_may_be_watched_over_https_with_a_ca_file() {
    let mut c = base();
    c.clusters[0].membership_url = "https://agent.internal:7701".into();
    c.clusters[0].membership_ca_file = Some("/etc/tidings/ca.pem".into());
    c.validate().expect("https membership is valid");
}

#[test]
fn minimal_config_gets_defaults() {
    let cfg = ProxyConfig::from_toml(
        r#"
        [[routes]]
        cluster = "api"
        [[clusters]]
        name = "api"
        service = "api"
        "#,
    )
    .expect("parses");
    cfg.validate().expect("valid");
    assert_eq!(cfg.admin.address.to_string(), "127.0.0.1:7711");
    assert_eq!(cfg.listeners[0].address.to_string(), "127.0.0.1:7710");
    let c = &cfg.clusters[0];
    assert_eq!(c.membership_url, "http://127.0.0.1:7701");
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.health_check.interval, Duration::from_secs(5));
    assert_eq!(c.retries.num_retries, 1);
    assert_eq!(c.circuit_breakers.max_retries, 3);
}

#[test]
fn unknown_keys_are_rejected() {
    let err =
        ProxyConfig::from_toml("[[clusters]]\nname = \"a\"\nservise = \"a\"\n").expect_err("typo");
    assert!(err.to_string().contains("servise"), "{err}");
}

fn base() -> ProxyConfig {
    ProxyConfig {
        routes: vec![RouteConfig {
            cluster: "a".into(),
            ..RouteConfig::default()
        }],
        clusters: vec![ClusterConfig {
            name: "a".into(),
            service: "a".into(),
            ..ClusterConfig::default()
        }],
        ..ProxyConfig::default()
    }
}

#[test]
fn validate_rejects_bad_values() {
    type Mutation = Box<dyn Fn(&mut ProxyConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "unknown cluster",
            Box::new(|c| c.routes[0].cluster = "nope".into()),
        ),
        ("no routes", Box::new(|c| c.routes.clear())),
        ("no listeners", Box::new(|c| c.listeners.clear())),
        (
            "duplicate",
            Box::new(|c| c.clusters.push(c.clusters[0].clone())),
        ),
        (
            "service name",
            Box::new(|c| c.clusters[0].service = "Bad Name".into()),
        ),
        (
            "membership_url",
            Box::new(|c| c.clusters[0].membership_url = "ftp://x".into()),
        ),
        (
            "panic",
            Box::new(|c| c.clusters[0].panic_threshold_percent = 101),
        ),
        (
            "thresholds",
            Box::new(|c| c.clusters[0].health_check.healthy_threshold = 0),
        ),
        (
            "path",
            Box::new(|c| c.clusters[0].health_check.path = "health".into()),
        ),
        (
            "path",
            Box::new(|c| c.clusters[0].health_check.path = "/h HTTP/1.1\r\nx: y".into()),
        ),
        (
            "statuses",
            Box::new(|c| c.clusters[0].health_check.expected_statuses = vec![700]),
        ),
        (
            "prefix",
            Box::new(|c| c.routes[0].path_prefix = Some("api".into())),
        ),
        (
            "header bytes",
            Box::new(|c| c.listeners[0].max_header_bytes = 100),
        ),
        (
            "hash header",
            Box::new(|c| c.clusters[0].hash_header = Some("bad header".into())),
        ),
        (
            "admin connections",
            Box::new(|c| c.admin.max_connections = 0),
        ),
        (
            "admin header timeout",
            Box::new(|c| c.admin.header_read_timeout = Duration::ZERO),
        ),
        (
            "admin idle timeout",
            Box::new(|c| c.admin.idle_timeout = Duration::ZERO),
        ),
    ];
    for (what, mutate) in cases {
        let mut c = base();
        mutate(&mut c);
        assert!(c.validate().is_err(), "{what} should be rejected");
    }
    base().validate().expect("base is valid");
}

#[test]
fn no_health_check_needs_no_check_settings() {
    let mut c = base();
    c.clusters[0].health_check.kind = HealthCheckKind::None;
    c.clusters[0].health_check.path = String::new();
    c.validate().expect("valid");
}

#[test]
fn durations_parse_and_round_trip() {
    assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(duration::parse("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(duration::parse("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
    // The workspace's one grammar: a bare number is seconds, as in every other config.
    assert_eq!(duration::parse("5"), Ok(Duration::from_secs(5)));
    for bad in ["", "5 dayz", "ms", "-1s", "99999999999999999999h"] {
        assert!(duration::parse(bad).is_err(), "{bad}");
    }
    let cfg = base();
    let text = toml::to_string(&cfg).expect("serialises");
    assert_eq!(ProxyConfig::from_toml(&text).expect("round trip"), cfg);
}

#[test]
fn a_tcp_listener_names_an_existing_plain_cluster_and_refuses_http_keys() {
    let tcp = |tune: &dyn Fn(&mut ListenerConfig)| {
        let mut c = base();
        let mut l = ListenerConfig {
            protocol: ListenerProtocol::Tcp,
            cluster: Some("a".into()),
            ..ListenerConfig::default()
        };
        tune(&mut l);
        c.listeners = vec![l];
        c.routes.clear();
        c
    };
    tcp(&|_| {})
        .validate()
        .expect("a tcp-only proxy needs no routes");
    let parsed = ProxyConfig::from_toml(
        "[[listeners]]\naddress = \"127.0.0.1:6380\"\nprotocol = \"tcp\"\ncluster = \"redis\"\n\
         idle_timeout = \"5m\"\n[[clusters]]\nname = \"redis\"\nservice = \"redis\"\n",
    )
    .expect("parses");
    parsed.validate().expect("valid");
    assert_eq!(
        parsed.listeners[0].tcp_idle_timeout(),
        Duration::from_secs(300)
    );
    type Tune = Box<dyn Fn(&mut ListenerConfig)>;
    let cases: Vec<(&str, Tune)> = vec![
        ("needs a cluster", Box::new(|l| l.cluster = None)),
        (
            "unknown cluster",
            Box::new(|l| l.cluster = Some("b".into())),
        ),
        (
            "HTTP listeners only",
            Box::new(|l| l.max_header_bytes = 1 << 20),
        ),
        (
            "HTTP listeners only",
            Box::new(|l| l.header_read_timeout = Duration::from_secs(1)),
        ),
        (
            "tls applies to HTTP",
            Box::new(|l| {
                l.tls = Some(ServerTlsConfig {
                    cert: "c".into(),
                    key: "k".into(),
                })
            }),
        ),
        (
            "idle_timeout must be positive",
            Box::new(|l| l.idle_timeout = Some(Duration::ZERO)),
        ),
    ];
    for (want, tune) in cases {
        let err = tcp(&*tune).validate().expect_err(want).to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains("listener 127.0.0.1:7710"), "{err}");
    }
    let mut h2 = tcp(&|_| {});
    h2.clusters[0].http2 = true;
    let err = h2.validate().expect_err("http2 cluster").to_string();
    assert!(err.contains("TCP listener cannot speak"), "{err}");
    // HTTP listeners refuse the TCP keys, and still need routes.
    let mut http = base();
    http.listeners[0].idle_timeout = Some(Duration::from_secs(1));
    let err = http
        .validate()
        .expect_err("idle_timeout on http")
        .to_string();
    assert!(err.contains("protocol = \"tcp\" listeners only"), "{err}");
    let mut no_routes = base();
    no_routes.routes.clear();
    assert!(no_routes.validate().is_err());
}
