//! Authentication: Ed25519 signing keys, access tokens, the in-memory session-version map, and
//! the authenticated caller extractor.

mod caller;
mod keys;
mod sessions;
mod tokens;

pub use caller::{AuthState, Caller};
pub use keys::{KeyError, KeySet};
pub use sessions::{SessionVersions, SESSION_MAP};
pub use tokens::{Claims, DownloadClaims, TokenError, TokenIssuer, TokenSubject};
