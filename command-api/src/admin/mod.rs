//! Operators' commands: retrying or skipping an event a consumer parked (the `ParkedEvent`
//! aggregate). Both are events in the log, which the consumer itself carries out when it reaches
//! them, so the answer is 202 with a consistency token: a read of the parked list that sends it
//! back shows the outcome.

mod routes;

pub use routes::{routes, ParkedEvents};
