//! SASL PLAIN (RFC 4616) and LOGIN, decoded once for SMTP submission,
//! POP3 and IMAP. Strict: an identity or password that is not UTF-8 is
//! malformed (never turned into U+FFFD and tried), and nobody may log in
//! as another user (the authorization identity must be empty or the same
//! as the authentication identity).

use base64::Engine;

/// Who logs in, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// Why a SASL response is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("malformed response")]
    Malformed,
    /// An authorization identity other than the user's own.
    #[error("logging in as another user is not permitted")]
    NotPermitted,
}

/// A client's base64 response (surrounding blanks ignored; `=` is the
/// empty response of RFC 4954).
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, SaslError> {
    let text = text.trim_ascii();
    if text.is_empty() || text == b"=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SaslError::Malformed)
}

/// `authzid NUL authcid NUL password`, already base64-decoded.
pub fn decode_plain(raw: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(authc), Some(pw), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    if authc.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authz.is_empty() && authz != authc {
        return Err(SaslError::NotPermitted);
    }
    Ok(Credentials {
        user: utf8(authc)?,
        password: utf8(pw)?,
    })
}

/// LOGIN: the user name and the password, each already base64-decoded.
pub fn decode_login(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    if user.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials {
        user: utf8(user)?,
        password: utf8(password)?,
    })
}

fn utf8(b: &[u8]) -> Result<String, SaslError> {
    String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed)
}

/// Base64 of a PLAIN response (clients and tests).
pub fn plain_response(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(raw: &[u8]) -> Result<Credentials, SaslError> {
        decode_plain(&decode_base64(
            base64::engine::general_purpose::STANDARD.encode(raw).as_bytes(),
        )?)
    }

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials {
            user: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn plain_table() {
        assert_eq!(plain(b"\0alice\0pw"), Ok(creds("alice", "pw")));
        assert_eq!(plain(b"alice\0alice\0pw"), Ok(creds("alice", "pw")));
        assert_eq!(plain(b"bob\0alice\0pw"), Err(SaslError::NotPermitted));
        assert_eq!(plain(b"alice\0pw"), Err(SaslError::Malformed));
        assert_eq!(plain(b"\0\0pw"), Err(SaslError::Malformed), "no user");
        assert_eq!(plain(b"\0a\0b\0c"), Err(SaslError::Malformed));
        assert_eq!(decode_base64(b"!!!"), Err(SaslError::Malformed));
        // UTF-8 identities (RFC 6531 users) pass through; other bytes are
        // malformed, not replaced.
        assert_eq!(
            plain("\0jürgen@example.org\0pw".as_bytes()),
            Ok(creds("jürgen@example.org", "pw"))
        );
        assert_eq!(plain(b"\0alice\0p\xffw"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(&[]), Err(SaslError::Malformed));
        assert_eq!(
            plain_response("alice", "pw"),
            base64::engine::general_purpose::STANDARD.encode("\0alice\0pw")
        );
    }

    #[test]
    fn login_table() {
        assert_eq!(decode_login(b"alice", b"pw"), Ok(creds("alice", "pw")));
        assert_eq!(decode_login(b"", b"pw"), Err(SaslError::Malformed));
        assert_eq!(decode_login(b"alice", b"\xff"), Err(SaslError::Malformed));
        assert_eq!(decode_base64(b" = "), Ok(Vec::new()));
    }
}
