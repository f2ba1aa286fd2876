//! The `Schedule` aggregate: cron schedules defined and removed over the API. Their firing state
//! (`next_run_at`, the last tick) lives in the `schedules` table; the cron expression and the
//! time zone are parsed where ticks are computed (the platform), so the domain checks the name,
//! the kind and the arguments.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::job::{valid_kind, ARGS_MAX_BYTES};

/// A schedule as defined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Unique name: lower-case letters, digits, `.`, `_`, `-`, at most 100.
    pub name: String,
    /// Cron expression, six fields (with seconds) or five.
    pub cron: String,
    /// IANA time zone.
    pub timezone: String,
    /// The job kind each tick enqueues.
    pub kind: String,
    /// The job's arguments.
    pub args: serde_json::Value,
}

/// Why a schedule command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The name is not a lower-case name.
    #[error("name must be 1 to 100 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")]
    BadName,
    /// The kind is not a kind name.
    #[error("kind must be a lower-case name such as 'analytics.rollup'")]
    BadKind,
    /// `args` is not an object or too large.
    #[error("args must be a JSON object of at most 65536 bytes")]
    BadArgs,
    /// Removing a schedule that is not defined.
    #[error("schedule not found")]
    NotFound,
}

/// A schedule name: 1 to 100 of `[a-z0-9._-]`, starting with a letter or digit.
#[must_use]
pub fn valid_schedule_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 100
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

impl ScheduleSpec {
    /// Checks what the domain can check of a definition: the name, the kind and the arguments
    /// (the expression and the zone are checked where ticks are computed).
    ///
    /// # Errors
    /// The first part that is wrong.
    pub fn check(&self) -> Result<(), ScheduleError> {
        if !valid_schedule_name(&self.name) {
            return Err(ScheduleError::BadName);
        }
        if !valid_kind(&self.kind) {
            return Err(ScheduleError::BadKind);
        }
        if !self.args.is_object() || serde_json::to_vec(&self.args).map_or(true, |b| b.len() > ARGS_MAX_BYTES) {
            return Err(ScheduleError::BadArgs);
        }
        Ok(())
    }
}

/// What can be done to a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleCommand {
    /// Define it, or replace its definition.
    Define(ScheduleSpec),
    /// Remove it.
    Remove {
        /// Its name.
        name: String,
    },
}

/// What happened to a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleEvent {
    /// Defined or redefined.
    ScheduleDefined(ScheduleSpec),
    /// Removed: no more ticks.
    ScheduleRemoved {
        /// Its name.
        name: String,
    },
}

impl DomainEvent for ScheduleEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ScheduleDefined(_) => "ScheduleDefined",
            Self::ScheduleRemoved { .. } => "ScheduleRemoved",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// What the log knows of a schedule (the aggregate id is its name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The current definition, if defined.
    pub spec: Option<ScheduleSpec>,
}

impl Aggregate for Schedule {
    const TYPE: &'static str = "Schedule";
    type Command = ScheduleCommand;
    type Event = ScheduleEvent;
    type Error = ScheduleError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            ScheduleCommand::Define(spec) => {
                spec.check()?;
                // Redefining with the very same definition records nothing.
                if self.spec.as_ref() == Some(&spec) {
                    return Ok(());
                }
                ScheduleEvent::ScheduleDefined(spec)
            }
            ScheduleCommand::Remove { name } => {
                if self.spec.is_none() {
                    return Err(ScheduleError::NotFound);
                }
                ScheduleEvent::ScheduleRemoved { name }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ScheduleEvent::ScheduleDefined(spec) => self.spec = Some(spec),
            ScheduleEvent::ScheduleRemoved { .. } => self.spec = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type ScheduleTest = TestFramework<Schedule>;

    fn spec() -> ScheduleSpec {
        ScheduleSpec {
            name: "nightly-report".into(),
            cron: "0 0 3 * * *".into(),
            timezone: "Europe/Paris".into(),
            kind: "noop".into(),
            args: serde_json::json!({}),
        }
    }

    #[test]
    fn a_schedule_is_defined_redefined_and_removed() {
        ScheduleTest::with(())
            .given_no_previous_events()
            .when(ScheduleCommand::Define(spec()))
            .then_expect_events(vec![ScheduleEvent::ScheduleDefined(spec())]);
        let changed = ScheduleSpec { cron: "0 0 4 * * *".into(), ..spec() };
        ScheduleTest::with(())
            .given(vec![ScheduleEvent::ScheduleDefined(spec())])
            .when(ScheduleCommand::Define(changed.clone()))
            .then_expect_events(vec![ScheduleEvent::ScheduleDefined(changed)]);
        ScheduleTest::with(())
            .given(vec![ScheduleEvent::ScheduleDefined(spec())])
            .when(ScheduleCommand::Remove { name: spec().name })
            .then_expect_events(vec![ScheduleEvent::ScheduleRemoved { name: spec().name }]);
    }

    #[test]
    fn the_same_definition_again_records_nothing() {
        ScheduleTest::with(())
            .given(vec![ScheduleEvent::ScheduleDefined(spec())])
            .when(ScheduleCommand::Define(spec()))
            .then_expect_events(vec![]);
    }

    #[test]
    fn removing_what_is_not_defined_is_refused() {
        ScheduleTest::with(())
            .given_no_previous_events()
            .when(ScheduleCommand::Remove { name: "x".into() })
            .then_expect_error(ScheduleError::NotFound);
        ScheduleTest::with(())
            .given(vec![ScheduleEvent::ScheduleDefined(spec()), ScheduleEvent::ScheduleRemoved { name: spec().name }])
            .when(ScheduleCommand::Remove { name: spec().name })
            .then_expect_error(ScheduleError::NotFound);
    }

    #[test]
    fn bad_definitions_name_what_is_wrong() {
        let define = |s: ScheduleSpec, e: ScheduleError| {
            ScheduleTest::with(()).given_no_previous_events().when(ScheduleCommand::Define(s)).then_expect_error(e);
        };
        define(ScheduleSpec { name: "Upper".into(), ..spec() }, ScheduleError::BadName);
        define(ScheduleSpec { name: String::new(), ..spec() }, ScheduleError::BadName);
        define(ScheduleSpec { name: "a".repeat(101), ..spec() }, ScheduleError::BadName);
        define(ScheduleSpec { kind: "9noop".into(), ..spec() }, ScheduleError::BadKind);
        define(ScheduleSpec { args: serde_json::json!("x"), ..spec() }, ScheduleError::BadArgs);
        assert!(ScheduleSpec { name: "0-hourly.x_y".into(), ..spec() }.check().is_ok());
    }
}
