//! The users read model: profile, list with filters, single user, role catalogue.

mod routes;
mod store;

pub use routes::routes;
pub use store::{Cursor, UserFilter, UserRow};
