//! Sign-in and sessions: login with lockout, refresh-token rotation with reuse detection,
//! logout, password change, email verification and password reset.
//!
//! - `guard`: how many password guesses an address may have checked, decided by Postgres.

mod cookies;
pub mod guard;
mod routes;
mod sessions;

pub use cookies::RefreshCookie;
pub use guard::LoginGuard;
pub use routes::routes;
pub(crate) use routes::{complete_sign_in, with_cookie};
pub use sessions::{Refreshed, SessionService};
