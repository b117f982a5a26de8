//! Optional bearer-token authentication for `SandboxService`. Health and reflection are served
//! outside this interceptor so probes and `grpcurl list` keep working without a token.

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::{error::Error, secrets::Live};

/// Accepts calls carrying `authorization: Bearer <token>` for any configured token; accepts
/// every call when no token is configured. Clones share the tokens, which
/// [`BearerAuth::set_tokens`] replaces (rotation); a call is checked against the set current
/// when it arrives.
#[derive(Clone)]
pub struct BearerAuth {
    /// `None`: no token at start, authentication off. Fixed at start, so rotation can never turn
    /// authentication off (or on).
    tokens: Option<Live<Vec<Vec<u8>>>>,
}

impl BearerAuth {
    pub fn new(tokens: &[String]) -> Self {
        BearerAuth {
            tokens: (!tokens.is_empty()).then(|| Live::new(encode(tokens))),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Accepts exactly `tokens` from now on. Refused (nothing changes) when authentication is
    /// off or `tokens` is empty.
    pub fn set_tokens(&self, tokens: &[String]) -> Result<(), String> {
        match &self.tokens {
            None => Err("authentication was off at start; restart to turn it on".into()),
            Some(_) if tokens.is_empty() => Err("no token given".into()),
            Some(current) => {
                current.set(encode(tokens));
                Ok(())
            }
        }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let Some(tokens) = &self.tokens else {
            return true;
        };
        // Every configured token is compared, in constant time for equal lengths, so timing
        // does not reveal which token or how much of it matched.
        tokens
            .get()
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(presented)
            })
            .into()
    }
}

fn encode(tokens: &[String]) -> Vec<Vec<u8>> {
    tokens
        .iter()
        .map(|t| t.trim().as_bytes().to_vec())
        .collect()
}

impl BearerAuth {
    /// Checks an `authorization` header value (`Bearer <token>`), for gRPC and REST alike.
    pub fn authorize(&self, header: Option<&str>) -> Result<(), Error> {
        if !self.is_enabled() {
            return Ok(());
        }
        let presented = header.and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match presented {
            Some(token) if self.accepts(token.as_bytes()) => Ok(()),
            _ => Err(Error::Unauthenticated),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.authorize(header)?;
        Ok(request)
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
        // Rotation cannot turn it on.
        assert!(auth.set_tokens(&["t".into()]).is_err());
        assert_eq!(call(&mut auth, None), Ok(()));
    }

    #[test]
    fn rotation_swaps_the_tokens_of_every_clone() {
        let auth = BearerAuth::new(&["old".into()]);
        let mut serving = auth.clone();
        auth.set_tokens(&["new".into()]).unwrap();
        let denied = Err(tonic::Code::Unauthenticated);
        assert_eq!(call(&mut serving, Some("Bearer old")), denied);
        assert_eq!(call(&mut serving, Some("Bearer new")), Ok(()));
        // An empty set would turn authentication off: refused, the tokens stay.
        assert!(auth.set_tokens(&[]).is_err());
        assert_eq!(call(&mut serving, None), denied);
        assert_eq!(call(&mut serving, Some("Bearer new")), Ok(()));
    }
}
