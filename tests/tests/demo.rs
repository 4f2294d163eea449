//! `tidings demo` is the README's first command: it must run the whole system on loopback,
//! survive its own registry SIGKILL without a failed request or lookup, and say so. It is
//! also the chaos test "registry SIGKILL during sustained traffic" (real processes: a
//! registry, agents, a proxy; traffic and agent lookups throughout; the registry killed
//! mid-run and restarted; p50/p99 and the outage length in its summary).

use std::time::Duration;

use tests::run;

#[test]
fn the_demo_survives_its_registry_outage() -> anyhow::Result<()> {
    let (code, out, err) = run(
        &[
            "demo",
            "--duration",
            "12s",
            "--hosts",
            "3",
            "--rate",
            "50",
            "--json",
        ],
        Duration::from_secs(150),
    )?;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let s: serde_json::Value = serde_json::from_str(&out)?;
    println!("demo summary: {s}");
    println!(
        "registry SIGKILLed under traffic for {:.1} s then restarted (a backend killed too): \
         {} requests through the proxy, {} failed, p50 {} ms, p99 {} ms; {} lookups on the \
         agents, {} failed; registry repopulated {} s after its restart",
        s["registry_down_s"].as_f64().unwrap_or(0.0),
        s["requests"],
        s["errors"],
        s["p50_ms"],
        s["p99_ms"],
        s["lookups"],
        s["lookups_failed"],
        s["registry_repopulated_s"]
    );
    // The whole run, not only the outage: the restart and the backend kill cost nothing
    // either (retries on, health checks win).
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["lookups_failed"], 0, "{s}");
    assert!(s["requests"].as_u64().unwrap_or(0) >= 300, "{s}");
    assert_eq!(s["errors_while_registry_down"], 0, "{s}");
    assert!(
        s["requests_while_registry_down"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    let down = s["lookups_while_registry_down"].as_u64().unwrap_or(0);
    assert!(
        down > 0 && s["lookups_served_while_registry_down"].as_u64() == Some(down),
        "{s}"
    );
    assert!(s["registry_down_s"].as_f64().unwrap_or(0.0) > 2.0, "{s}");
    assert!(
        s["registry_repopulated_s"].as_f64().is_some(),
        "the restarted registry repopulated: {s}"
    );
    Ok(())
}
