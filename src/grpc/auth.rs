//! Optional bearer-token authentication for `SandboxService`. Health and reflection are served
//! outside this interceptor so probes and `grpcurl list` keep working without a token.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::error::Error;

/// Accepts calls carrying `authorization: Bearer <token>` for any configured token; accepts
/// every call when no token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Arc<[Vec<u8>]>,
}

impl BearerAuth {
    pub fn new(tokens: &[String]) -> Self {
        BearerAuth {
            tokens: tokens
                .iter()
                .map(|t| t.trim().as_bytes().to_vec())
                .collect(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        // Every configured token is compared, in constant time for equal lengths, so timing
        // does not reveal which token or how much of it matched.
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented)
            })
            .into()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.is_enabled() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match presented {
            Some(token) if self.accepts(token.as_bytes()) => Ok(request),
            _ => Err(Error::Unauthenticated.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn checks_bearer_tokens() {
        let mut auth = BearerAuth::new(&["old".into(), "new".into()]);
        let denied = Err(tonic::Code::Unauthenticated);
        assert_eq!(call(&mut auth, None), denied);
        assert_eq!(call(&mut auth, Some("Bearer nope")), denied);
        assert_eq!(call(&mut auth, Some("Bearer ol")), denied);
        assert_eq!(call(&mut auth, Some("Basic old")), denied);
        assert_eq!(call(&mut auth, Some("old")), denied);
        assert_eq!(call(&mut auth, Some("Bearer old")), Ok(()));
        assert_eq!(call(&mut auth, Some("bearer new")), Ok(()));
    }

    #[test]
    fn open_when_no_token_is_set() {
        let mut auth = BearerAuth::new(&[]);
        assert_eq!(call(&mut auth, None), Ok(()));
    }
}
