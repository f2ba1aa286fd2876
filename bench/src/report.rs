//! Results: one row per measurement, cairn beside its baseline and the ratio, rendered as a
//! Markdown table on standard output and written as JSON to `<out>/<scenario>.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::service::Memory;
use crate::stats::Summary;

/// Progress and warnings, on standard error so standard output stays the report.
pub fn note(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "bench: {message}");
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// Throughput (or the quantity itself, for memory).
    pub value: f64,
    /// Its unit: `commands/s`, `events/s`, `MiB`, …
    pub unit: String,
    /// Latency percentiles, when the measure has them.
    pub latency: Option<Summary>,
}

impl Measure {
    /// A rate with its latencies.
    #[must_use]
    pub fn rate(value: f64, unit: &str, latency: Option<Summary>) -> Self {
        Self { value, unit: unit.to_owned(), latency }
    }
}

/// What the same work costs without cairn, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// What it is.
    pub name: String,
    /// What it measured.
    pub measure: Measure,
}

/// A goal and whether this run reached it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The goal, e.g. `>= 0.5 x baseline`.
    pub goal: String,
    /// Whether this run reached it.
    pub met: bool,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// cairn's figure.
    pub cairn: Measure,
    /// Failed operations in the measured window.
    pub errors: u64,
    /// The service's memory at the end of this measurement.
    pub memory: Option<Memory>,
    /// The baseline beside it.
    pub baseline: Option<Baseline>,
    /// cairn ÷ baseline (throughputs), so higher is better.
    pub ratio: Option<f64>,
    /// The goal for this row.
    pub target: Option<Target>,
    /// Anything else worth keeping.
    pub extra: BTreeMap<String, Value>,
}

impl Row {
    /// A row with cairn's figure only.
    #[must_use]
    pub fn new(name: impl Into<String>, cairn: Measure) -> Self {
        Self {
            name: name.into(),
            cairn,
            errors: 0,
            memory: None,
            baseline: None,
            ratio: None,
            target: None,
            extra: BTreeMap::new(),
        }
    }

    /// Adds the baseline and the ratio cairn ÷ baseline.
    #[must_use]
    pub fn baseline(mut self, name: impl Into<String>, measure: Measure) -> Self {
        self.ratio = (measure.value > 0.0).then(|| self.cairn.value / measure.value);
        self.baseline = Some(Baseline { name: name.into(), measure });
        self
    }

    /// Sets the ratio explicitly (when it is not a ratio of the two values).
    #[must_use]
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    /// Adds the service's memory.
    #[must_use]
    pub fn memory(mut self, memory: Option<Memory>) -> Self {
        self.memory = memory;
        self
    }

    /// Adds the failure count.
    #[must_use]
    pub fn errors(mut self, errors: u64) -> Self {
        self.errors = errors;
        self
    }

    /// Adds a goal.
    #[must_use]
    pub fn target(mut self, goal: &str, met: bool) -> Self {
        self.target = Some(Target { goal: goal.to_owned(), met });
        self
    }

    /// Keeps an extra figure.
    #[must_use]
    pub fn extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
}

/// The load average and core count, since other work on the machine moves the figures.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores available.
    pub cores: usize,
    /// `/proc/loadavg` when the scenario started.
    pub load_at_start: String,
    /// `/proc/loadavg` when it ended.
    pub load_at_end: String,
}

/// Reads the 1-, 5- and 15-minute load averages.
#[must_use]
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// When it finished (RFC 3339, UTC).
    pub finished_at: String,
    /// Whether `--quick` shortened it.
    pub quick: bool,
    /// How long the whole scenario took, set-up included.
    pub seconds: f64,
    /// The machine.
    pub machine: Machine,
    /// The rows.
    pub rows: Vec<Row>,
    /// Sizes and remarks.
    pub notes: Vec<String>,
}

impl Report {
    /// Writes `<dir>/<scenario>.json`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The Markdown table (with a heading and the notes).
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "\n### {}{} ({:.0} s, load {} → {})\n\n",
            self.scenario,
            if self.quick { " --quick" } else { "" },
            self.seconds,
            self.machine.load_at_start,
            self.machine.load_at_end
        );
        out.push_str(TABLE_HEAD);
        for row in &self.rows {
            out.push_str(&row_markdown(&self.scenario, row));
        }
        for note in &self.notes {
            out.push_str(&format!("\n- {note}"));
        }
        out.push('\n');
        out
    }
}

/// The heading of the results table.
pub const TABLE_HEAD: &str = "| scenario | measure | cairn | p50 ms | p95 ms | p99 ms | errors | service RSS peak / end MiB | baseline | baseline figure | ratio | target |\n\
                              |---|---|---|---|---|---|---|---|---|---|---|---|\n";

/// One row of the results table.
#[must_use]
pub fn row_markdown(scenario: &str, row: &Row) -> String {
    let latency = row.cairn.latency;
    let ms = |f: fn(&Summary) -> f64| latency.as_ref().map_or_else(|| "—".to_owned(), |s| format_ms(f(s)));
    let memory = row.memory.map_or_else(|| "—".to_owned(), |m| format!("{:.1} / {:.1}", m.peak_mib, m.rss_mib));
    let (baseline_name, baseline_value) = row.baseline.as_ref().map_or_else(
        || ("—".to_owned(), "—".to_owned()),
        |b| {
            let p99 = b.measure.latency.map(|s| format!(" (p99 {} ms)", format_ms(s.p99_ms))).unwrap_or_default();
            (b.name.clone(), format!("{}{p99}", format_value(&b.measure)))
        },
    );
    let ratio = row.ratio.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}"));
    let target = row
        .target
        .as_ref()
        .map_or_else(|| "—".to_owned(), |t| format!("{} **{}**", t.goal, if t.met { "met" } else { "missed" }));
    format!(
        "| {scenario} | {} | {} | {} | {} | {} | {} | {memory} | {baseline_name} | {baseline_value} | {ratio} | {target} |\n",
        row.name,
        format_value(&row.cairn),
        ms(|s| s.p50_ms),
        ms(|s| s.p95_ms),
        ms(|s| s.p99_ms),
        row.errors,
    )
}

fn format_value(measure: &Measure) -> String {
    let value = measure.value;
    let number = if value >= 100.0 {
        group_thousands(value.round() as u64)
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    format!("{number} {}", measure.unit)
}

fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(format_value(&Measure::rate(12_345.6, "events/s", None)), "12,346 events/s");
        assert_eq!(format_value(&Measure::rate(42.42, "MiB", None)), "42.4 MiB");
        assert_eq!(format_ms(4.321), "4.32");
    }

    #[test]
    fn ratio_is_cairn_over_baseline() {
        let row =
            Row::new("x", Measure::rate(50.0, "ops/s", None)).baseline("raw", Measure::rate(200.0, "ops/s", None));
        assert_eq!(row.ratio, Some(0.25));
        assert!(row_markdown("write", &row).contains("| 0.25 |"));
    }
}
