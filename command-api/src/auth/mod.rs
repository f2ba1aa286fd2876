//! Sign-in and sessions: login with lockout, refresh-token rotation with reuse detection,
//! logout, password change, email verification and password reset.

mod cookies;
mod routes;
mod sessions;

pub use cookies::RefreshCookie;
pub(crate) use routes::complete_sign_in;
pub use routes::routes;

/// Verification and reset requests looked up at once; more are dropped (their answer is 202 either way).
pub const MAIL_REQUESTS_IN_FLIGHT: usize = 256;
pub use sessions::{Refreshed, SessionService};
