//! The `ParkedEvent` aggregate: an operator's decisions about one event a consumer parked.
//!
//! A consumer that cannot apply an event parks it (a row in `parked_events`, not an event: the
//! consumer writes it in its own transaction) and moves on. What the operator then decides is
//! a fact worth keeping, so it is an event: a retry request, applied by the consumer itself in
//! its own order, or a skip. The id is `<consumer>:<event id>`.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate id for `event_id` parked by `consumer`.
#[must_use]
pub fn parked_event_id(consumer: &str, event_id: Uuid) -> String {
    format!("{consumer}:{event_id}")
}

/// What the operator has decided so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// Retries asked for.
    pub retries: u32,
    /// Skipped on purpose: nothing more can be asked.
    pub skipped: bool,
}

/// What an operator can ask about a parked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkedEventCommand {
    /// Apply it again (after a fix was deployed, say).
    Retry {
        /// The consumer that parked it.
        consumer: String,
        /// The parked event.
        event_id: Uuid,
    },
    /// Leave it unapplied for good.
    Skip {
        /// The consumer that parked it.
        consumer: String,
        /// The parked event.
        event_id: Uuid,
        /// Why, in the operator's words.
        reason: Option<String>,
    },
}

/// What was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParkedEventEvent {
    /// The consumer is to apply the event again, when it reaches this request in the log.
    ParkedEventRetryRequested {
        /// The consumer that parked it.
        consumer: String,
        /// The parked event.
        event_id: Uuid,
    },
    /// The event stays unapplied by this consumer.
    ParkedEventSkipped {
        /// The consumer that parked it.
        consumer: String,
        /// The parked event.
        event_id: Uuid,
        /// Why.
        reason: Option<String>,
    },
}

impl DomainEvent for ParkedEventEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ParkedEventRetryRequested { .. } => "ParkedEventRetryRequested",
            Self::ParkedEventSkipped { .. } => "ParkedEventSkipped",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParkedEventError {
    /// It was skipped already (409).
    #[error("the event was skipped; it can no longer be retried or skipped")]
    AlreadySkipped,
    /// A skip reason over 500 characters (400).
    #[error("reason must be at most 500 characters")]
    ReasonTooLong,
}

impl Aggregate for ParkedEvent {
    const TYPE: &'static str = "ParkedEvent";
    type Command = ParkedEventCommand;
    type Event = ParkedEventEvent;
    type Error = ParkedEventError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if self.skipped {
            return Err(ParkedEventError::AlreadySkipped);
        }
        let event = match command {
            ParkedEventCommand::Retry { consumer, event_id } => {
                ParkedEventEvent::ParkedEventRetryRequested { consumer, event_id }
            }
            ParkedEventCommand::Skip { consumer, event_id, reason } => {
                let reason = reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
                if reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
                    return Err(ParkedEventError::ReasonTooLong);
                }
                ParkedEventEvent::ParkedEventSkipped { consumer, event_id, reason }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ParkedEventEvent::ParkedEventRetryRequested { .. } => self.retries += 1,
            ParkedEventEvent::ParkedEventSkipped { .. } => self.skipped = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type ParkedTest = TestFramework<ParkedEvent>;

    fn id() -> Uuid {
        Uuid::from_u128(7)
    }

    #[test]
    fn an_operator_may_retry_as_often_as_needed() {
        ParkedTest::with(())
            .given(vec![ParkedEventEvent::ParkedEventRetryRequested { consumer: "users".into(), event_id: id() }])
            .when(ParkedEventCommand::Retry { consumer: "users".into(), event_id: id() })
            .then_expect_events(vec![ParkedEventEvent::ParkedEventRetryRequested {
                consumer: "users".into(),
                event_id: id(),
            }]);
    }

    #[test]
    fn a_skip_is_final_and_keeps_its_reason() {
        ParkedTest::with(())
            .given_no_previous_events()
            .when(ParkedEventCommand::Skip {
                consumer: "users".into(),
                event_id: id(),
                reason: Some("  written by hand by mistake ".into()),
            })
            .then_expect_events(vec![ParkedEventEvent::ParkedEventSkipped {
                consumer: "users".into(),
                event_id: id(),
                reason: Some("written by hand by mistake".into()),
            }]);
        ParkedTest::with(())
            .given(vec![ParkedEventEvent::ParkedEventSkipped {
                consumer: "users".into(),
                event_id: id(),
                reason: None,
            }])
            .when(ParkedEventCommand::Retry { consumer: "users".into(), event_id: id() })
            .then_expect_error(ParkedEventError::AlreadySkipped);
    }

    #[test]
    fn an_overlong_reason_is_refused() {
        ParkedTest::with(())
            .given_no_previous_events()
            .when(ParkedEventCommand::Skip { consumer: "users".into(), event_id: id(), reason: Some("x".repeat(501)) })
            .then_expect_error(ParkedEventError::ReasonTooLong);
    }
}
