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
                if !valid_schedule_name(&spec.name) {
                    return Err(ScheduleError::BadName);
                }
                if !valid_kind(&spec.kind) {
                    return Err(ScheduleError::BadKind);
                }
                if !spec.args.is_object() || serde_json::to_vec(&spec.args).map_or(true, |b| b.len() > ARGS_MAX_BYTES) {
                    return Err(ScheduleError::BadArgs);
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
