//! The protobuf codec of `SandboxService`: prost's, except that a request that does not decode
//! (invalid UTF-8 in a string, a wrong wire type, a truncated message) is the caller's error,
//! `INVALID_ARGUMENT`, not tonic's `INTERNAL`. `build.rs` points the generated code here.
//! [`oversize_as_resource_exhausted`] does the same for requests over the size limit, which
//! tonic refuses before any codec runs.

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    codegen::http::{self, HeaderValue},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode failures reported as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(self.0.decoder())
    }
}

/// Prost's decoder with its errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!("malformed message: {}", status.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// What tonic's decoder says of a message over the size limit
/// ("Error, decoded message length too large: found N bytes, the limit is: M bytes").
const OVERSIZE_MESSAGE: &str = "message length too large";

/// Rewrites tonic's `OUT_OF_RANGE` for a request over the size limit into `RESOURCE_EXHAUSTED`,
/// the code gRPC's own implementations use for it. Only a trailers-only response (status in the
/// headers) with tonic's own message is touched: that is how tonic refuses a request before its
/// handler runs, so a status a handler returns (mid-stream, or OUT_OF_RANGE of its own) is never
/// changed.
pub fn oversize_as_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = HeaderValue::from(Code::OutOfRange as i32);
    // Handlers answer OUT_OF_RANGE too (a resume position outside a job's log): only tonic's
    // own size refusal is changed.
    let oversize = headers
        .get("grpc-message")
        .map(|m| percent_encoding::percent_decode(m.as_bytes()).decode_utf8_lossy())
        .is_some_and(|m| m.contains(OVERSIZE_MESSAGE));
    if oversize && headers.get("grpc-status") == Some(&out_of_range) {
        headers.insert(
            "grpc-status",
            HeaderValue::from(Code::ResourceExhausted as i32),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const TONIC_OVERSIZE: &str = "Error,%20decoded%20message%20length%20too%20large:%20found%2099%20bytes,%20the%20limit%20is:%2010%20bytes";

    fn with_status(code: Code, message: &'static str) -> http::Response<()> {
        let mut response = http::Response::new(());
        let headers = response.headers_mut();
        headers.insert("grpc-status", HeaderValue::from(code as i32));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        response
    }

    #[test]
    fn only_tonics_oversize_refusal_becomes_resource_exhausted() {
        let status = |r: http::Response<()>| r.headers()["grpc-status"].clone();
        assert_eq!(
            status(oversize_as_resource_exhausted(with_status(
                Code::OutOfRange,
                TONIC_OVERSIZE
            ))),
            HeaderValue::from(Code::ResourceExhausted as i32)
        );
        for (code, message) in [
            (Code::Ok, ""),
            (Code::InvalidArgument, TONIC_OVERSIZE),
            (Code::Internal, ""),
            // A handler's own OUT_OF_RANGE (a resume position outside a job's log).
            (Code::OutOfRange, "job%20j:%20seq%209%20is%20beyond"),
        ] {
            assert_eq!(
                status(oversize_as_resource_exhausted(with_status(code, message))),
                HeaderValue::from(code as i32)
            );
        }
        let plain = oversize_as_resource_exhausted(http::Response::new(()));
        assert!(plain.headers().get("grpc-status").is_none());
    }
}
