//! Cron schedules: parsing an expression in a time zone, the next tick, the built-in schedules,
//! the `CAIRN_SCHEDULES_FILE` format, and writing a definition to the `schedules` table.
//!
//! An expression has six fields (`sec min hour day-of-month month day-of-week`) or five (the
//! seconds are then 0), and is read on the wall clock of an IANA time zone: `0 0 9 * * *` in
//! `Europe/Paris` is 08:00 UTC in winter and 07:00 UTC in summer.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::Deserialize;
use sqlx::PgConnection;

/// The longest cron expression accepted, in bytes.
pub const CRON_MAX_LEN: usize = 200;

/// A parsed cron expression and the zone its ticks follow.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

/// Which part of a definition is wrong, and why (for a 400 naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// `cron` or `timezone`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl CronSchedule {
    /// Parses `cron` (five or six fields) in `timezone` (an IANA name such as `Europe/Paris`).
    ///
    /// # Errors
    /// A malformed expression, one that never fires, or an unknown zone.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, SpecError> {
        let bad_cron = |problem: String| SpecError { field: "cron", problem };
        let fields = cron.split_whitespace().count();
        if cron.len() > CRON_MAX_LEN || !(5..=6).contains(&fields) {
            return Err(bad_cron(format!(
                "must have six fields (sec min hour day month weekday) or five (min hour day month weekday), at most {CRON_MAX_LEN} characters"
            )));
        }
        let zone = Tz::from_str(timezone).map_err(|_| SpecError {
            field: "timezone",
            problem: format!("'{timezone}' is not an IANA time zone such as 'UTC' or 'Europe/Paris'"),
        })?;
        let parsed = Cron::new(cron)
            .with_seconds_optional()
            .parse()
            .map_err(|e| bad_cron(format!("is not a valid cron expression: {e}")))?;
        let schedule = Self { cron: parsed, zone };
        // An expression that can never match (the 30th of February) is refused here rather than
        // left to a scheduler that could never fire it.
        if schedule.next_after(Utc::now()).is_none() {
            return Err(bad_cron("never fires".to_owned()));
        }
        Ok(schedule)
    }

    /// The first tick strictly after `after`, in UTC; None when there is none.
    #[must_use]
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }
}

/// A schedule's definition: from the API, the configuration file, or the built-ins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    /// Unique name: lower-case letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Five or six fields.
    pub cron: String,
    /// IANA zone (default UTC).
    #[serde(default = "utc")]
    pub timezone: String,
    /// The job kind each tick enqueues.
    pub kind: String,
    /// The job's arguments (default `{}`).
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
}

fn utc() -> String {
    "UTC".to_owned()
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// Where a schedule was defined (`schedules.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `POST /api/v1/schedules`: its definition is an event in the log.
    Api,
    /// `CAIRN_SCHEDULES_FILE`.
    Config,
    /// Shipped with cairn.
    Builtin,
}

impl Source {
    /// The column's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Config => "config",
            Self::Builtin => "builtin",
        }
    }
}

/// The schedules that ship with cairn; a configuration entry of the same name replaces one.
#[must_use]
pub fn builtin() -> Vec<ScheduleDef> {
    let def = |name: &str, cron: &str, kind: &str| ScheduleDef {
        name: name.to_owned(),
        cron: cron.to_owned(),
        timezone: utc(),
        kind: kind.to_owned(),
        args: empty_object(),
    };
    vec![
        def("files.sweep", "0 */5 * * * *", super::kinds::FILES_SWEEP),
        def("sessions.purge", "0 0 * * * *", super::kinds::SESSIONS_PURGE),
        def("analytics.rollup", "0 10 0 * * *", super::kinds::ANALYTICS_ROLLUP),
    ]
}

/// Reads `CAIRN_SCHEDULES_FILE`: a JSON array of `{name, cron, timezone?, kind, args?}`, each
/// checked (name, expression, zone, kind and arguments) so that a bad file stops the process at
/// start with the entry named.
///
/// # Errors
/// An unreadable file, malformed JSON, a duplicate name, or an entry that does not check.
pub fn load_file(path: &Path, settings: &super::JobsSettings) -> anyhow::Result<Vec<ScheduleDef>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("CAIRN_SCHEDULES_FILE: cannot read {}", path.display()))?;
    let defs: Vec<ScheduleDef> = serde_json::from_str(&text).with_context(|| {
        format!(
            "CAIRN_SCHEDULES_FILE: {} must be a JSON array of {{name, cron, timezone?, kind, args?}}",
            path.display()
        )
    })?;
    let mut seen = std::collections::BTreeSet::new();
    for def in &defs {
        check(def, settings).map_err(|e| anyhow::anyhow!("CAIRN_SCHEDULES_FILE: schedule '{}': {e}", def.name))?;
        if !seen.insert(def.name.clone()) {
            anyhow::bail!("CAIRN_SCHEDULES_FILE: schedule '{}' is listed twice", def.name);
        }
    }
    Ok(defs)
}

/// Checks a definition and returns its parsed expression.
///
/// # Errors
/// The first field that is wrong.
pub fn check(def: &ScheduleDef, settings: &super::JobsSettings) -> Result<CronSchedule, SpecError> {
    if !valid_name(&def.name) {
        return Err(SpecError {
            field: "name",
            problem: "must be 1 to 100 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
                .to_owned(),
        });
    }
    let schedule = CronSchedule::parse(&def.cron, &def.timezone)?;
    super::kinds::validate(&def.kind, &def.args, settings)
        .map_err(|problem| SpecError { field: super::kinds::field_of(&problem), problem })?;
    Ok(schedule)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 100
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// What [`upsert`] found before it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    /// The source of the row it replaced.
    pub source: String,
    /// Its version (the `Schedule` aggregate's last sequence).
    pub version: i64,
}

/// Writes `def` from `source` in the caller's transaction: a new schedule's first tick is the
/// first after `now`; a redefinition keeps the tick it was waiting for when the expression and
/// the zone are unchanged, and otherwise waits for the new expression's first tick after `now`.
/// `version` is stored as given. Returns the row it replaced, if any.
///
/// # Errors
/// Database errors.
pub async fn upsert(
    conn: &mut PgConnection,
    def: &ScheduleDef,
    schedule: &CronSchedule,
    source: Source,
    version: i64,
    now: DateTime<Utc>,
) -> Result<Option<Previous>, sqlx::Error> {
    let previous: Option<(String, i64, String, String)> =
        sqlx::query_as("SELECT source, version, cron, timezone FROM schedules WHERE name = $1 FOR UPDATE")
            .bind(&def.name)
            .fetch_optional(&mut *conn)
            .await?;
    let first = schedule.next_after(now).unwrap_or(now);
    let keeps_tick = previous.as_ref().is_some_and(|(_, _, cron, zone)| *cron == def.cron && *zone == def.timezone);
    sqlx::query(
        "INSERT INTO schedules (name, cron, timezone, kind, args, source, next_run_at, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
         ON CONFLICT (name) DO UPDATE SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, kind = EXCLUDED.kind, \
           args = EXCLUDED.args, source = EXCLUDED.source, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, \
           next_run_at = CASE WHEN $10 THEN schedules.next_run_at ELSE EXCLUDED.next_run_at END",
    )
    .bind(&def.name)
    .bind(&def.cron)
    .bind(&def.timezone)
    .bind(&def.kind)
    .bind(&def.args)
    .bind(source.as_str())
    .bind(first)
    .bind(version)
    .bind(now)
    .bind(keeps_tick)
    .execute(&mut *conn)
    .await?;
    Ok(previous.map(|(source, version, _, _)| Previous { source, version }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap_or_else(|| panic!("bad time"))
    }

    fn parse(cron: &str, zone: &str) -> CronSchedule {
        CronSchedule::parse(cron, zone).unwrap_or_else(|e| panic!("{cron} in {zone}: {e}"))
    }

    #[test]
    fn every_second_ticks_on_each_second_strictly_after() {
        let s = parse("* * * * * *", "UTC");
        assert_eq!(s.next_after(at(2026, 1, 1, 0, 0, 0)), Some(at(2026, 1, 1, 0, 0, 1)));
        let half = at(2026, 1, 1, 0, 0, 0) + chrono::Duration::milliseconds(500);
        assert_eq!(s.next_after(half), Some(at(2026, 1, 1, 0, 0, 1)));
    }

    #[test]
    fn five_fields_mean_seconds_zero() {
        let s = parse("*/5 * * * *", "UTC");
        assert_eq!(s.next_after(at(2026, 3, 2, 10, 2, 30)), Some(at(2026, 3, 2, 10, 5, 0)));
        let builtin_rollup = parse("0 10 0 * * *", "UTC");
        assert_eq!(builtin_rollup.next_after(at(2026, 3, 2, 0, 10, 0)), Some(at(2026, 3, 3, 0, 10, 0)));
    }

    #[test]
    fn a_zone_follows_its_wall_clock_across_daylight_saving() {
        let paris = parse("0 0 9 * * *", "Europe/Paris");
        // Winter: UTC+1.
        assert_eq!(paris.next_after(at(2026, 1, 15, 0, 0, 0)), Some(at(2026, 1, 15, 8, 0, 0)));
        // Summer: UTC+2.
        assert_eq!(paris.next_after(at(2026, 7, 15, 0, 0, 0)), Some(at(2026, 7, 15, 7, 0, 0)));
        // The day the clocks go forward (29 March 2026), 09:00 is already summer time.
        assert_eq!(paris.next_after(at(2026, 3, 28, 9, 0, 0)), Some(at(2026, 3, 29, 7, 0, 0)));
        let new_york = parse("0 30 17 * * 1-5", "America/New_York");
        // Friday 16 January 2026, 17:30 EST = 22:30 UTC; then Monday the 19th.
        assert_eq!(new_york.next_after(at(2026, 1, 16, 12, 0, 0)), Some(at(2026, 1, 16, 22, 30, 0)));
        assert_eq!(new_york.next_after(at(2026, 1, 16, 22, 30, 0)), Some(at(2026, 1, 19, 22, 30, 0)));
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        for bad in ["", "* * * *", "* * * * * * * *", "61 * * * * *", "* * * * * mon-xyz", "nonsense here a b c"] {
            let err = CronSchedule::parse(bad, "UTC").err();
            assert_eq!(err.map(|e| e.field), Some("cron"), "{bad:?} should be refused");
        }
        let err = CronSchedule::parse("* * * * * *", "Mars/Olympus").err();
        assert_eq!(err.map(|e| e.field), Some("timezone"));
        let never = CronSchedule::parse("0 0 0 30 2 *", "UTC").err();
        assert_eq!(never.map(|e| e.field), Some("cron"));
    }

    #[test]
    fn the_builtins_check_and_a_file_entry_is_checked() {
        let none = |_: &str| None;
        let settings = super::super::JobsSettings::from_lookup(&none, crate::settings::Environment::Development)
            .unwrap_or_else(|e| panic!("{e}"));
        for def in builtin() {
            assert!(check(&def, &settings).is_ok(), "{def:?}");
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("schedules.json");
        std::fs::write(&file, r#"[{"name":"nightly","cron":"0 0 3 * * *","timezone":"Europe/Paris","kind":"noop"}]"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let defs = load_file(&file, &settings).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defs[0].args, serde_json::json!({}));
        std::fs::write(&file, r#"[{"name":"x","cron":"* * *","kind":"noop"}]"#).unwrap_or_else(|e| panic!("{e}"));
        let err = load_file(&file, &settings).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("'x'") && err.contains("cron"), "{err}");
        std::fs::write(&file, r#"[{"name":"x","cron":"* * * * *","kind":"nope"}]"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(load_file(&file, &settings).is_err());
    }
}
