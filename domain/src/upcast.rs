//! Upcasters: an event stored under an older `event_version` is read as the current shape, so a
//! stored event is never rewritten and every reader (aggregates, projections) sees one shape.
//!
//! Payloads are stored externally tagged (`{"UserRegistered": {…}}`); an upcaster rewrites the
//! body under the tag and names the version it produces. Chains apply in turn (1 → 2 → 3).
//!
//! | event | from | to | change |
//! |---|---|---|---|
//! | `UserRegistered` | 1 | 2 | v2 always carries `roles`; a v1 body without them held the seeded `user` role |

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::Value;

/// One step from `from` to `to` for `event_type`.
#[derive(Clone, Copy)]
pub struct Upcaster {
    /// The event type it reads.
    pub event_type: &'static str,
    /// The version it reads.
    pub from: &'static str,
    /// The version it produces.
    pub to: &'static str,
    /// Rewrites the body (the value under the type tag).
    pub body: fn(serde_json::Map<String, Value>) -> serde_json::Map<String, Value>,
}

/// Every upcaster, oldest step first.
pub const UPCASTERS: &[Upcaster] =
    &[Upcaster { event_type: "UserRegistered", from: "1", to: "2", body: user_registered_v1_to_v2 }];

fn user_registered_v1_to_v2(mut body: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    body.entry("roles").or_insert_with(|| Value::Array(vec![Value::String(crate::roles::DEFAULT_ROLE.to_owned())]));
    body
}

impl Upcaster {
    fn step(&self, payload: Value) -> Value {
        match payload {
            Value::Object(mut outer) => {
                if let Some(Value::Object(body)) = outer.remove(self.event_type) {
                    outer.insert(self.event_type.to_owned(), Value::Object((self.body)(body)));
                }
                Value::Object(outer)
            }
            other => other,
        }
    }
}

/// Brings `payload`, stored as `event_type` at `event_version`, to the current shape. Returns
/// the payload and its version; both unchanged when no upcaster applies.
#[must_use]
pub fn upcast(event_type: &str, event_version: &str, payload: Value) -> (Value, String) {
    let mut version = event_version.to_owned();
    let mut payload = payload;
    while let Some(step) = UPCASTERS.iter().find(|u| u.event_type == event_type && u.from == version) {
        payload = step.step(payload);
        step.to.clone_into(&mut version);
    }
    (payload, version)
}

/// Whether an event stored as `event_type` at `event_version` needs upcasting.
#[must_use]
pub fn needs_upcast(event_type: &str, event_version: &str) -> bool {
    UPCASTERS.iter().any(|u| u.event_type == event_type && u.from == event_version)
}

/// The upcasters in the form postgres-es's event store takes.
#[must_use]
pub fn event_store_upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(Chain)]
}

/// Every upcaster as one, for cqrs-es.
struct Chain;

impl EventUpcaster for Chain {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        needs_upcast(event_type, event_version)
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        let (payload, version) = upcast(&event.event_type, &event.event_version, event.payload);
        event.payload = payload;
        event.event_version = version;
        event
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::UserEvent;

    #[test]
    fn a_v1_registration_without_roles_reads_as_v2_with_the_user_role() {
        let stored = json!({"UserRegistered": {"email": "a@example.com", "display_name": "A", "password_hash": "h"}});
        let (payload, version) = upcast("UserRegistered", "1", stored);
        assert_eq!(version, "2");
        let event: UserEvent = serde_json::from_value(payload).expect("the current shape");
        assert!(matches!(event, UserEvent::UserRegistered { roles, .. } if roles == ["user"]));
    }

    #[test]
    fn current_events_and_v1_bodies_that_had_roles_are_left_alone() {
        let stored = json!({"UserRegistered": {"email": "a@example.com", "display_name": "A", "password_hash": "h", "roles": ["admin"]}});
        assert_eq!(upcast("UserRegistered", "1", stored.clone()).0, stored);
        assert_eq!(upcast("UserRegistered", "2", stored.clone()), (stored, "2".to_owned()));
        assert!(!needs_upcast("RoleGranted", "1"));
    }
}
