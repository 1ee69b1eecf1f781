//! API tokens: `rsl_<id>_<secret>`. The id is public (it names the token in
//! the log and in `token list`); the secret is 32 random bytes that only the
//! holder knows. The log keeps an argon2id hash of the secret (salted, slow:
//! a stolen data dir does not give tokens away); a node that checked a secret
//! once remembers its BLAKE3 hash in memory, so that a request costs one
//! constant-time comparison, not an argon2 run.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use resolute_core::command::NewToken;

/// What every token starts with (so that a leaked one is easy to grep for).
pub const TOKEN_PREFIX: &str = "rsl_";
/// Random bytes in a token's id.
const TOKEN_ID_BYTES: usize = 8;
/// Random bytes in a token's secret.
const TOKEN_SECRET_BYTES: usize = 32;
/// Random bytes of argon2 salt.
const SALT_BYTES: usize = 16;

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The OS gave no random bytes.
    #[error("no randomness from the OS: {0}")]
    Random(String),
    /// argon2 failed (it does not, with its default parameters).
    #[error("hashing the token: {0}")]
    Hash(String),
}

/// A token's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The public id.
    pub id: &'a str,
    /// The secret.
    pub secret: &'a str,
}

/// Splits a token into id and secret; `None` when it is not shaped like one.
pub fn parse(token: &str) -> Option<Parsed<'_>> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, TOKEN_ID_BYTES) && hex(secret, TOKEN_SECRET_BYTES)).then_some(Parsed { id, secret })
}

fn random_hex(n: usize) -> Result<String, TokenError> {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh `<prefix><id>_<secret>`: the text to hand out once, and what the
/// log keeps (`hash` of the secret, never the secret).
fn fresh(
    prefix: &str,
    label: &str,
    expires_ms: Option<u64>,
    hash: impl FnOnce(&str) -> Result<String, TokenError>,
) -> Result<(String, NewToken), TokenError> {
    let id = random_hex(TOKEN_ID_BYTES)?;
    let secret = random_hex(TOKEN_SECRET_BYTES)?;
    let hash = hash(&secret)?;
    let token = NewToken {
        id,
        hash,
        expires_ms,
        label: label.to_string(),
    };
    Ok((format!("{prefix}{}_{secret}", token.id), token))
}

/// A fresh API token: its argon2id hash, salted.
pub fn mint(label: &str, expires_ms: Option<u64>) -> Result<(String, NewToken), TokenError> {
    fresh(TOKEN_PREFIX, label, expires_ms, |secret| {
        let mut salt = [0u8; SALT_BYTES];
        getrandom::getrandom(&mut salt).map_err(|e| TokenError::Random(e.to_string()))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| TokenError::Hash(e.to_string()))?;
        Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| TokenError::Hash(e.to_string()))
    })
}

/// A fresh join token (`rsj_<id>_<secret>`): the BLAKE3 of the secret, which
/// every replica checks (256 random bits need no slow hash).
pub fn mint_join(label: &str, expires_ms: Option<u64>) -> Result<(String, NewToken), TokenError> {
    let prefix = resolute_core::state::auth::JOIN_TOKEN_PREFIX;
    fresh(prefix, label, expires_ms, |secret| {
        Ok(blake3::hash(secret.as_bytes()).to_hex().to_string())
    })
}

/// Whether `secret` matches the argon2 `hash` from the log (slow: run it off
/// the async workers).
pub fn verify_slow(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The fast fingerprint a node remembers for a secret it verified; compare
/// two with `==`, which is constant-time for `blake3::Hash`.
pub fn fingerprint(secret: &str) -> blake3::Hash {
    blake3::hash(secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_parses_and_verifies_and_others_do_not() {
        let (text, stored) = mint("test", None).expect("mint");
        let p = parse(&text).expect("parses");
        assert_eq!(p.id, stored.id);
        assert!(verify_slow(p.secret, &stored.hash));
        assert!(
            !stored.hash.contains(p.secret),
            "the secret is not in the log"
        );
        let (other, _) = mint("other", None).expect("mint");
        let o = parse(&other).expect("parses");
        assert!(!verify_slow(o.secret, &stored.hash));
        for bad in [
            "",
            "rsl_",
            "rsl_00_11",
            "abc_0011223344556677_x",
            &text[..text.len() - 1],
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
