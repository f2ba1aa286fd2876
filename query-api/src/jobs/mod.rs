//! Operators' view of the job queue and the schedules, read from the `jobs` and `schedules`
//! tables themselves (they are the truth about each job, written in the transaction of each
//! change, so a read never lags a command).
//!
//! - [`store`]: the queries, shared by the HTTP routes and `cairn jobs`.
//! - `routes`: `GET /api/v1/jobs`, `GET /api/v1/jobs/{id}`, `GET /api/v1/schedules`.

mod routes;
pub mod store;

pub use routes::routes;
pub use store::{JobFilter, JobView, ScheduleView};
