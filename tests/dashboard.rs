//! Grafana provisioning and dashboards, checked against what the consumer writes.

mod support;

use std::path::Path;

use candlestream::config::Settings;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&repo(path)).unwrap().remove(0)
}

#[test]
fn grafana_dashboard_queries_what_the_consumer_writes() {
    let datasources = yaml("grafana/provisioning/datasources/influxdb.yaml");
    let ds = &datasources["datasources"][0];
    let uid = ds["uid"].as_str().unwrap();
    assert_eq!(ds["jsonData"]["version"].as_str(), Some("Flux"));
    assert_eq!(ds["url"].as_str(), Some("http://influxdb:8086"));
    let providers = yaml("grafana/provisioning/dashboards/candlestream.yaml");
    assert_eq!(providers["providers"][0]["options"]["path"].as_str(), Some("/var/lib/grafana/dashboards"));

    // What the consumer writes, read off its own line protocol.
    let tick = support::pipeline::make_ticks(&["tBTCUSD"], 1, 0, 0).remove(0);
    let mut line = String::new();
    let measurement = Settings::default().influx.measurement;
    candlestream::sink::influx::write_line(&mut line, &measurement, &tick);
    let tag = line.split([',', '=']).nth(1).unwrap();
    assert!(line.contains(" bid=") && line.contains(",last_price="));

    let dashboard: Value = serde_json::from_str(&repo("grafana/dashboards/candles.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], uid, "panel {}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], uid, "target of {}", p["title"]);
        }
    }
    let var = &dashboard["templating"]["list"][0];
    assert_eq!(var["name"], "symbol");
    assert_eq!(var["datasource"]["uid"], uid);
    assert!(var["query"].as_str().unwrap().contains(&format!("tag: \"{tag}\"")));

    let candles = panels.iter().find(|p| p["type"] == "candlestick").expect("a candlestick panel");
    let q = candles["targets"][0]["query"].as_str().unwrap();
    for needle in [
        format!("r._measurement == \"{measurement}\""),
        format!("r.{tag} == \"${{symbol}}\""),
        "r._field == \"last_price\"".to_string(),
        "every: 2m".to_string(),
    ] {
        assert!(q.contains(&needle), "candlestick query lacks {needle}:\n{q}");
    }
    for f in ["first", "max", "min", "last"] {
        assert!(q.contains(&format!("fn: {f}")), "candlestick query lacks {f}");
    }
    for kind in ["stat", "timeseries"] {
        assert!(panels.iter().any(|p| p["type"] == kind), "no {kind} panel");
    }
}

