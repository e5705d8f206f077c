//! Password hashing: argon2id with the crate's recommended parameters
//! (19 MiB, 2 passes), stored as PHC strings.
//!
//! Both functions are slow on purpose (tens of milliseconds): call them from
//! a blocking thread, never on an async executor thread.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

/// Passwords longer than this are refused: hashing cost grows with length
/// and nobody types 1 KiB passwords.
pub const PASSWORD_BYTES_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password must be 1 to {PASSWORD_BYTES_MAX} bytes")]
    BadLength,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Hashes a password into a PHC string (`$argon2id$v=19$...`).
pub fn hash(password: &str) -> Result<String, PasswordError> {
    if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
        return Err(PasswordError::BadLength);
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Checks a password against a PHC string. A malformed hash never verifies.
pub fn verify(password: &str, phc: &str) -> bool {
    if password.len() > PASSWORD_BYTES_MAX {
        return false;
    }
    Argon2::default().verify_password(password.as_bytes(), phc).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_then_verify() {
        let h = super::hash("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("s3cret", &h));
        assert!(!super::verify("s3creT", &h));
        assert!(!super::verify("s3cret", "not a hash"));
        assert!(super::hash("").is_err());
    }
}
