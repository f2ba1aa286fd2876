//! Sign-in and sessions: login with lockout, refresh-token rotation with reuse detection,
//! logout, password change, email verification and password reset.

mod cookies;
mod routes;
mod sessions;

pub use cookies::RefreshCookie;
pub use routes::routes;
pub(crate) use routes::{complete_sign_in, with_cookie};
pub use sessions::{Refreshed, SessionService};
