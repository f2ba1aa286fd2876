//! Roles: the catalogue used when issuing tokens, and the routes that define and edit roles.

mod catalog;
mod routes;

pub use catalog::RoleCatalog;
pub use routes::routes;
