//! Hostile clients: requests that are not valid protobuf, or too large, get the caller's error
//! code (never `INTERNAL`); a flood of connections that never speak cannot lock out a
//! well-behaved client; and after each, a well-behaved client is served as before.

mod common;

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use sandbox_runner::{
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::{procfs, server_process::ServerProcess},
};
use tokio::net::TcpStream;
use tonic::{
    Code, Request, Status,
    client::Grpc,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

/// Sends request bodies as given bytes and returns response bodies as bytes, so a test can put
/// anything on the wire.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls a unary method with a raw body; returns the status code (`Ok` when it succeeded).
async fn unary(channel: &Channel, method: &'static str, body: Vec<u8>) -> (Code, String) {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static(method);
    match grpc
        .unary(Request::new(Bytes::from(body)), path, RawCodec)
        .await
    {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// Calls Exec with a raw body and reads the first message or the error.
async fn exec(channel: &Channel, body: Vec<u8>) -> (Code, String) {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/sandbox.v1.SandboxService/Exec");
    let result = grpc
        .server_streaming(Request::new(Bytes::from(body)), path, RawCodec)
        .await;
    match result {
        Ok(response) => match response.into_inner().message().await {
            Ok(_) => (Code::Ok, String::new()),
            Err(status) => (status.code(), status.message().to_owned()),
        },
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// Builds a request body broken in the given field.
type BodyFor = fn(u8) -> Vec<u8>;

/// A length-delimited field: tag (field number, wire type 2), length, bytes.
fn string_field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = value.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
    out
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_on_every_rpc() {
    let server = common::start(&[]).await;
    let channel = server.channel().await;
    // Each body is broken in the field that carries the request's main string: `command` (4)
    // for Exec, `job_id` (1) for Status and Cancel.
    let cases: [(&str, BodyFor); 4] = [
        ("invalid UTF-8 in a string", |field| {
            string_field(field, b"echo \xff\xfe")
        }),
        // Sent as a varint (wire type 0) instead of length-delimited.
        ("wrong wire type", |field| vec![field << 3, 0x01]),
        // A string whose length runs past the end of the message.
        ("truncated message", |field| {
            vec![(field << 3) | 2, 0x10, b'e', b'c']
        }),
        // Field 0 does not exist in protobuf.
        ("field number 0", |_| vec![0x02, 0x00]),
    ];
    for (what, body) in cases {
        let (code, message) = exec(&channel, body(4)).await;
        assert_eq!(code, Code::InvalidArgument, "Exec, {what}: {message}");
        assert!(message.contains("malformed"), "Exec, {what}: {message}");
        for method in [
            "/sandbox.v1.SandboxService/Status",
            "/sandbox.v1.SandboxService/Cancel",
        ] {
            let (code, message) = unary(&channel, method, body(1)).await;
            assert_eq!(code, Code::InvalidArgument, "{method}, {what}: {message}");
            assert!(message.contains("malformed"), "{method}, {what}: {message}");
        }
    }

    // Unknown fields are not an error: protobuf skips them, so newer clients work.
    let mut body = string_field(4, b"echo ok");
    body.extend(string_field(15, b"from the future"));
    let (code, message) = exec(&channel, body).await;
    assert_eq!(code, Code::Ok, "{message}");

    // A well-behaved client is still served.
    let mut client = server.client().await;
    let run = common::run(&mut client, common::shell("echo hi")).await;
    assert_eq!(run.stdout, b"hi\n");
    server.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_resource_exhausted() {
    let server = common::start(&[]).await;
    let channel = server.channel().await;
    // Over tonic's 4 MiB default decoding limit.
    let huge = string_field(4, &vec![b'x'; 5 << 20]);
    let (code, message) = exec(&channel, huge.clone()).await;
    assert_eq!(code, Code::ResourceExhausted, "Exec: {message}");
    let (code, message) = unary(&channel, "/sandbox.v1.SandboxService/Status", huge).await;
    assert_eq!(code, Code::ResourceExhausted, "Status: {message}");

    let mut client = server.client().await;
    let run = common::run(&mut client, common::shell("echo hi")).await;
    assert_eq!(run.stdout, b"hi\n");
    server.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");

/// The server binary under `ulimit -n 256` (soft and hard, so it cannot raise it).
async fn server_with_256_fds(extra: &[&str]) -> ServerProcess {
    let mut command = tokio::process::Command::new("/bin/sh");
    command.args(["-c", "ulimit -n 256 && exec \"$@\"", "sh", BIN]);
    command.args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"]);
    command.args(extra);
    ServerProcess::spawn(command).await.expect("server starts")
}

/// Raises this process's soft open-file limit to its hard limit; returns the new limit.
fn raise_own_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

#[tokio::test]
async fn silent_connections_cannot_lock_out_a_real_client() {
    let server = server_with_256_fds(&["--max-concurrent-jobs", "8"]).await;
    // As many silent connections as this process can hold, up to 2,000; each attempt is
    // bounded, since past the server's backlog the kernel stops answering SYNs.
    let wanted = 2_000.min(raise_own_fd_limit().saturating_sub(200) as usize);
    let mut silent = Vec::new();
    for _ in 0..wanted {
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(&server.addr)).await
        {
            silent.push(conn);
        }
    }
    assert!(
        silent.len() * 2 >= wanted,
        "only {} of {wanted} connected",
        silent.len()
    );

    let started = Instant::now();
    let channel = tokio::time::timeout(Duration::from_secs(10), server.channel())
        .await
        .expect("a real client connects despite the silent ones")
        .unwrap();
    let mut client = SandboxServiceClient::new(channel);
    client.health(pb::HealthRequest {}).await.unwrap();
    let stream = client
        .exec(common::shell("echo hi"))
        .await
        .unwrap()
        .into_inner();
    let run = common::Job::from_stream(stream).await.finish().await;
    assert_eq!(run.stdout, b"hi\n");
    eprintln!(
        "{} silent connections held; Health and Exec answered in {:?}",
        silent.len(),
        started.elapsed()
    );
    // The server never held more connections than its descriptors allow.
    assert!(procfs::fd_count(server.pid) <= 256);
    drop(silent);
    server.stop().await;
}
