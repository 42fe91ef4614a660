//! `compare`: the side-by-side table of several runs' JSON files.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::client::System;
use crate::BoxError;

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

fn passed(v: &Value) -> bool {
    v.get("pass").and_then(Value::as_bool).unwrap_or(false)
}

/// Of several runs of one label and system: the passing run with the most deliveries per
/// second (the sustainable rate); if none passed, the one with the lowest offered load.
fn best(runs: &[Value]) -> Option<&Value> {
    let key = |v: &Value| num(v, &["delivered_per_sec"]).unwrap_or(0.0);
    let offered = |v: &Value| num(v, &["offered_deliveries_per_sec"]).unwrap_or(0.0);
    runs.iter()
        .filter(|v| passed(v))
        .max_by(|a, b| key(a).total_cmp(&key(b)))
        .or_else(|| runs.iter().min_by(|a, b| offered(a).total_cmp(&offered(b))))
}

/// The lowest offered load among failed runs above the best passing one.
fn first_failure(runs: &[Value], best: &Value) -> Option<String> {
    let offered = |v: &Value| num(v, &["offered_deliveries_per_sec"]).unwrap_or(0.0);
    let floor = offered(best);
    runs.iter()
        .filter(|v| !passed(v) && offered(v) > floor)
        .min_by(|a, b| offered(a).total_cmp(&offered(b)))
        .map(|v| {
            let mut why: Vec<String> = Vec::new();
            for k in ["failures", "slo_misses"] {
                if let Some(a) = v.get(k).and_then(Value::as_array) {
                    why.extend(a.iter().filter_map(|s| s.as_str().map(str::to_owned)));
                }
            }
            format!("{:.0}/s: {}", offered(v), why.join("; "))
        })
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

struct Row {
    name: &'static str,
    values: Vec<Option<f64>>,
    /// Whether a ratio of the two values means anything.
    ratio: bool,
}

/// The order of the table's sections: fixed loads first, then the sustainable rates.
fn rank(label: &str) -> (usize, &str) {
    let r = match label {
        "idle" => 0,
        "direct" => 1,
        "room" => 2,
        "max-direct" => 3,
        "max-room" => 4,
        _ => 5,
    };
    (r, label)
}

fn server_cpu(v: &Value) -> Option<f64> {
    let cpu = v.get("cpu_percent")?.as_object()?;
    let sum: f64 = cpu
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "bench" | "machine" | "other"))
        .filter_map(|(_, c)| c.as_f64())
        .sum();
    (!cpu.is_empty()).then_some(sum)
}

pub fn compare(files: &[PathBuf], numerator: System) -> Result<String, BoxError> {
    let mut groups: BTreeMap<(String, String), BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let scenario = v["scenario"].as_str().unwrap_or("?").to_owned();
        let label = v["label"].as_str().unwrap_or(&scenario).to_owned();
        let system = v["system"].as_str().unwrap_or("?").to_owned();
        groups
            .entry((label, scenario))
            .or_default()
            .entry(system)
            .or_default()
            .push(v);
    }
    let denominator = if numerator == System::Chatmesh {
        System::Socketio
    } else {
        System::Chatmesh
    };
    let order = [numerator, denominator];
    let mut out = String::new();
    let mut sections: Vec<_> = groups.iter().collect();
    sections.sort_by(|a, b| rank(&a.0 .0).cmp(&rank(&b.0 .0)));
    for ((label, scenario), by_system) in sections {
        let runs: Vec<&[Value]> = order
            .iter()
            .map(|s| by_system.get(s.name()).map(Vec::as_slice).unwrap_or(&[]))
            .collect();
        let chosen: Vec<Option<&Value>> = runs.iter().map(|r| best(r)).collect();
        let Some(any) = chosen.iter().flatten().next() else {
            continue;
        };
        if label == scenario {
            let _ = writeln!(out, "\n### {label}\n");
        } else {
            let _ = writeln!(out, "\n### {label} ({scenario})\n");
        }
        if let Some(d) = any.get("describe").and_then(Value::as_str) {
            let _ = writeln!(out, "{d}\n");
        }
        let _ = writeln!(
            out,
            "| metric | {} | {} | {} ÷ {} |",
            order[0].name(),
            order[1].name(),
            order[0].name(),
            order[1].name()
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let get = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<Option<f64>> {
            chosen.iter().map(|c| c.and_then(f)).collect()
        };
        let row = |name: &'static str, f: &dyn Fn(&Value) -> Option<f64>, ratio: bool| Row {
            name,
            values: get(f),
            ratio,
        };
        let rows: Vec<Row> = if scenario == "idle" {
            vec![
                row("connections open", &|v| num(v, &["connected"]), true),
                row("connects/s", &|v| num(v, &["connects_per_sec"]), true),
                row(
                    "server RSS per connection, KiB",
                    &|v| num(v, &["rss_per_connection_kib"]),
                    true,
                ),
                row(
                    "server RSS with the connections open, MiB",
                    &|v| {
                        let m = v.get("rss_after_kib")?.as_object()?;
                        Some(m.values().filter_map(Value::as_f64).sum::<f64>() / 1024.0)
                    },
                    true,
                ),
                row(
                    "failed + dropped",
                    &|v| Some(num(v, &["failed"])? + num(v, &["closed_early"])?),
                    false,
                ),
            ]
        } else {
            vec![
                Row {
                    name: "runs (load steps)",
                    values: runs.iter().map(|r| Some(r.len() as f64)).collect(),
                    ratio: false,
                },
                row(
                    "offered deliveries/s",
                    &|v| num(v, &["offered_deliveries_per_sec"]),
                    true,
                ),
                row("delivered/s", &|v| num(v, &["delivered_per_sec"]), true),
                row("latency p50 ms", &|v| num(v, &["latency_ms", "p50"]), true),
                row("latency p99 ms", &|v| num(v, &["latency_ms", "p99"]), true),
                row(
                    "latency p99.9 ms",
                    &|v| num(v, &["latency_ms", "p999"]),
                    true,
                ),
                row("latency max ms", &|v| num(v, &["latency_ms", "max"]), true),
                row(
                    "lost + duplicated",
                    &|v| Some(num(v, &["lost"])? + num(v, &["duplicated"])?),
                    false,
                ),
                row("server CPU % (sum of watched processes)", &server_cpu, true),
                row(
                    "server CPU µs per delivery",
                    &|v| {
                        let d = num(v, &["delivered_per_sec"])?;
                        (d > 0.0).then(|| server_cpu(v).map(|c| c / 100.0 / d * 1e6))?
                    },
                    true,
                ),
                row("bench CPU %", &|v| num(v, &["cpu_percent", "bench"]), false),
                row(
                    "other processes' CPU % (noise)",
                    &|v| num(v, &["cpu_percent", "other"]),
                    false,
                ),
            ]
        };
        for row in rows {
            let cell = |x: Option<f64>| x.map(fmt_num).unwrap_or_else(|| "-".into());
            let ratio = match (row.values[0], row.values[1]) {
                (Some(a), Some(b)) if row.ratio && b != 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} |",
                row.name,
                cell(row.values[0]),
                cell(row.values[1])
            );
        }
        let verdicts: Vec<String> = order
            .iter()
            .zip(&chosen)
            .map(|(s, c)| {
                let v = match c {
                    Some(v) if passed(v) => "pass".to_owned(),
                    Some(_) => "FAIL".to_owned(),
                    None => "not run".to_owned(),
                };
                format!("{}: {v}", s.name())
            })
            .collect();
        let _ = writeln!(out, "\nverdict: {}", verdicts.join(", "));
        for ((s, c), r) in order.iter().zip(&chosen).zip(&runs) {
            if let Some(c) = c {
                if r.len() > 1 {
                    if let Some(f) = first_failure(r, c) {
                        let _ = writeln!(out, "{} first failed at {f}", s.name());
                    }
                }
                if !passed(c) {
                    if let Some(a) = c.get("failures").and_then(Value::as_array) {
                        for f in a.iter().filter_map(Value::as_str) {
                            let _ = writeln!(out, "{}: {f}", s.name());
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_best_passing_run() {
        let runs = vec![
            serde_json::json!({"pass": true, "delivered_per_sec": 100.0, "offered_deliveries_per_sec": 100.0}),
            serde_json::json!({"pass": true, "delivered_per_sec": 200.0, "offered_deliveries_per_sec": 200.0}),
            serde_json::json!({"pass": false, "delivered_per_sec": 300.0, "offered_deliveries_per_sec": 400.0,
                "slo_misses": ["p99 80 ms over 50 ms"]}),
        ];
        let b = best(&runs).unwrap();
        assert_eq!(num(b, &["delivered_per_sec"]), Some(200.0));
        assert_eq!(
            first_failure(&runs, b).unwrap(),
            "400/s: p99 80 ms over 50 ms"
        );
        let failing = vec![runs[2].clone()];
        assert!(!passed(best(&failing).unwrap()));
    }
}
