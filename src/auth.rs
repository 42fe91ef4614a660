//! Who is connecting: development mode trusts `?uid=`, JWT mode wants `?token=`.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::valid_id;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing ?uid= (development mode)")]
    MissingUid,
    #[error("uid must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadUid,
    #[error("this server requires ?token= (a JWT); ?uid= is not accepted")]
    UidRefused,
    #[error("missing ?token=")]
    MissingToken,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("token subject must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadSubject,
}

#[derive(Clone)]
pub enum Authenticator {
    Development,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Authenticator {
    pub fn new(jwt_secret: Option<&str>) -> Self {
        match jwt_secret {
            None => Authenticator::Development,
            Some(secret) => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.leeway = 5;
                Authenticator::Jwt {
                    key: Box::new(DecodingKey::from_secret(secret.as_bytes())),
                    validation: Box::new(validation),
                }
            }
        }
    }

    pub fn is_development(&self) -> bool {
        matches!(self, Authenticator::Development)
    }

    /// The user id for a connection with these query parameters.
    pub fn authenticate(
        &self,
        uid: Option<&str>,
        token: Option<&str>,
    ) -> Result<String, AuthError> {
        match self {
            Authenticator::Development => {
                let uid = uid.ok_or(AuthError::MissingUid)?;
                if valid_id(uid) {
                    Ok(uid.to_owned())
                } else {
                    Err(AuthError::BadUid)
                }
            }
            Authenticator::Jwt { key, validation } => {
                if uid.is_some() {
                    return Err(AuthError::UidRefused);
                }
                let token = token.ok_or(AuthError::MissingToken)?;
                let data =
                    decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                        _ => AuthError::BadToken(e.to_string()),
                    })?;
                if valid_id(&data.claims.sub) {
                    Ok(data.claims.sub)
                } else {
                    Err(AuthError::BadSubject)
                }
            }
        }
    }
}

/// Makes an HS256 token for `sub` that expires at `exp` (seconds since the epoch).
/// For tests and for operators who want to try JWT mode by hand.
pub fn make_token(
    secret: &str,
    sub: &str,
    exp: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        sub: &'a str,
        exp: u64,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &Out { sub, exp },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn development_mode() {
        let a = Authenticator::new(None);
        assert_eq!(a.authenticate(Some("alice"), None), Ok("alice".into()));
        assert_eq!(a.authenticate(None, None), Err(AuthError::MissingUid));
        assert_eq!(a.authenticate(Some("a b"), None), Err(AuthError::BadUid));
    }

    #[test]
    fn jwt_mode() {
        let a = Authenticator::new(Some("s3cret"));
        let good = make_token("s3cret", "alice", now() + 60).unwrap();
        assert_eq!(a.authenticate(None, Some(&good)), Ok("alice".into()));
        assert_eq!(
            a.authenticate(Some("alice"), Some(&good)),
            Err(AuthError::UidRefused)
        );
        assert_eq!(a.authenticate(None, None), Err(AuthError::MissingToken));
        let expired = make_token("s3cret", "alice", now() - 120).unwrap();
        assert_eq!(
            a.authenticate(None, Some(&expired)),
            Err(AuthError::Expired)
        );
        let forged = make_token("other", "alice", now() + 60).unwrap();
        assert!(matches!(
            a.authenticate(None, Some(&forged)),
            Err(AuthError::BadToken(_))
        ));
        let bad_sub = make_token("s3cret", "a:b", now() + 60).unwrap();
        assert_eq!(
            a.authenticate(None, Some(&bad_sub)),
            Err(AuthError::BadSubject)
        );
    }
}
