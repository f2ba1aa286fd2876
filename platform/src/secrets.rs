//! Random tokens and their hashes. Tokens handed to users (refresh tokens, emailed links) are
//! 256-bit random values; only their SHA-256 hashes are ever stored.

use base64::Engine;
use ring::rand::SecureRandom;

/// A new 256-bit random token, URL-safe base64 without padding.
///
/// # Errors
/// When the system's random source fails.
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("system random source failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Hex SHA-256 of a token: what is stored and compared.
#[must_use]
pub fn hash_token(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_unique_and_hash_stably() -> anyhow::Result<()> {
        let a = random_token()?;
        let b = random_token()?;
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_eq!(hash_token(&a).len(), 64);
        Ok(())
    }
}
