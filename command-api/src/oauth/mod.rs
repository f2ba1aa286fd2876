//! OAuth 2.0 / OpenID Connect sign-in: authorization code with PKCE, `state` and `nonce` each
//! usable once. An account is linked by verified email; a new address opens a new account.
//!
//! The frontend asks `POST /api/v1/auth/oauth/{provider}/start` for the provider's URL, sends the
//! user there, receives `code` and `state` back on its own page, and posts them to
//! `POST /api/v1/auth/oauth/{provider}/callback`, which answers like a password sign-in.
//!
//! Each sign-in is bound to the client that started it, so nobody can sign a victim into the
//! attacker's account with the attacker's `{code, state}`: a browser by a short-lived cookie
//! holding a hash of the state, a native client by its own PKCE verifier.

mod flow;
pub(crate) mod routes;

pub use flow::{OAuth, Proof, StartMode, Started, STATE_TTL_SECS};
pub use routes::routes;
