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

/// Verification and reset requests looked up at once; more are dropped (their answer is 202 either way).
pub const MAIL_REQUESTS_IN_FLIGHT: usize = 256;
pub use sessions::{Refreshed, SessionService};
