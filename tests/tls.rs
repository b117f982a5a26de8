//! TLS and mTLS on the one port: gRPC and REST (HTTP/1.1 and h2 by ALPN) over TLS, client
//! certificates accepted and refused, a certificate rotated on disk while a connection made
//! before it keeps working, files that do not make a configuration refused at start, and the
//! CLI over mTLS. Certificates are made by the test; loopback only; every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{JobState, SecretFile, shell};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use sandbox_runner::{
    Config,
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Upper bound of the wait for a rotation to be picked up.
const PATIENCE: Duration = Duration::from_secs(30);

/// A certificate authority of the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for localhost and 127.0.0.1.
    fn server(&self, name: &str) -> Pair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with this common name and organisation.
    fn client(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "platform");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The server's TLS files, kept for the test's length.
struct ServerFiles {
    cert: SecretFile,
    key: SecretFile,
    client_ca: Option<SecretFile>,
}

impl ServerFiles {
    fn new(pair: &Pair, client_ca: Option<&Ca>) -> ServerFiles {
        ServerFiles {
            cert: SecretFile::new(&pair.cert),
            key: SecretFile::new(&pair.key),
            client_ca: client_ca.map(|ca| SecretFile::new(&ca.pem())),
        }
    }

    fn args(&self) -> Vec<&str> {
        let mut args = vec![
            "--tls-cert-file",
            self.cert.path(),
            "--tls-key-file",
            self.key.path(),
            "--secret-poll-interval",
            "100ms",
        ];
        if let Some(ca) = &self.client_ca {
            args.extend(["--tls-client-ca-file", ca.path()]);
        }
        args
    }
}

/// A gRPC channel over TLS trusting `ca` (and presenting `identity`), or the connection error.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

async fn healthy(channel: Channel) -> Result<(), tonic::Status> {
    SandboxServiceClient::new(channel)
        .health(pb::HealthRequest {})
        .await
        .map(|_| ())
}

/// `echo` run to its end through `channel`, checked against the stream contract.
async fn echo_through(channel: Channel, text: &str) {
    let mut client = SandboxServiceClient::new(channel);
    let run = common::run(&mut client, shell(&format!("echo {text}"))).await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.stdout, format!("{text}\n").as_bytes());
}

/// A REST client over TLS trusting `ca`; HTTP/1.1 only (ALPN `http/1.1` alone) when asked.
fn rest_client(ca: &Ca, identity: Option<&Pair>, http1_only: bool) -> reqwest::Client {
    sandbox_runner::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10));
    if let Some(pair) = identity {
        let pem = format!("{}{}", pair.cert, pair.key);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn grpc_and_rest_over_tls_on_one_port_and_plaintext_is_refused() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server("server one"), None);
    let server = common::start(&files.args()).await;

    let channel = tls_channel(server.addr, &ca, None)
        .await
        .expect("TLS connect");
    healthy(channel.clone()).await.expect("Health over TLS");
    echo_through(channel, "over-tls").await;

    // REST: HTTP/1.1 (a client that offers only http/1.1 by ALPN) and h2, on the same port.
    let url = format!("https://localhost:{}/health", server.addr.port());
    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let response = rest_client(&ca, None, http1_only)
            .get(&url)
            .send()
            .await
            .expect("REST over TLS");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }

    // Plaintext HTTP/2 to a TLS port gets no service.
    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let refused = match plaintext.connect().await {
        Err(_) => true,
        Ok(channel) => healthy(channel).await.is_err(),
    };
    assert!(refused, "plaintext was served on a TLS port");
    // A client that does not trust the server's CA is refused by its own side.
    assert!(
        tls_channel(server.addr, &Ca::new("other CA"), None)
            .await
            .is_err()
    );
    server.stop().await;
}

#[tokio::test]
async fn mtls_serves_clients_of_its_ca_and_refuses_the_rest() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = ServerFiles::new(&server_ca.server("server"), Some(&client_ca));
    let metrics_port = common::scrape::free_port();
    let mut args = files.args();
    let metrics_port_arg = metrics_port.to_string();
    args.extend(["--metrics-port", &metrics_port_arg]);
    let server = common::start(&args).await;
    let tls_refusals = |s: &common::scrape::Scrape| {
        s.sum("sandbox_connections_refused_total", &["reason=\"tls\""])
    };
    let before = tls_refusals(&common::scrape::Scrape::get(metrics_port).await);

    let alice = client_ca.client("alice");
    let channel = tls_channel(server.addr, &server_ca, Some(&alice))
        .await
        .expect("mTLS connect");
    healthy(channel.clone())
        .await
        .expect("Health with a client certificate");
    echo_through(channel, "over-mtls").await;
    let response = rest_client(&server_ca, Some(&alice), true)
        .get(format!("https://localhost:{}/health", server.addr.port()))
        .send()
        .await
        .expect("REST with a client certificate");
    assert_eq!(response.status(), 200);

    // No certificate, and a certificate of another CA: no call gets through. (TLS 1.3 finishes
    // the client's side of the handshake before the server checks the certificate, so the
    // refusal may come at connect or at the first call.)
    let mallory = Ca::new("mallory CA").client("mallory");
    for identity in [None, Some(&mallory)] {
        let refused = match tls_channel(server.addr, &server_ca, identity).await {
            Err(_) => true,
            Ok(channel) => healthy(channel).await.is_err(),
        };
        assert!(refused, "a client without a trusted certificate was served");
        let rest = rest_client(&server_ca, identity, true)
            .get(format!("https://localhost:{}/health", server.addr.port()))
            .send()
            .await;
        assert!(
            rest.is_err(),
            "REST served a client without a trusted certificate"
        );
    }
    // Each refused handshake is counted (other tests of this process only add to the count).
    let after = tls_refusals(&common::scrape::Scrape::get(metrics_port).await);
    assert!(after >= before + 4.0, "{before} -> {after}");
    // And the server still serves its clients.
    let channel = tls_channel(server.addr, &server_ca, Some(&alice))
        .await
        .unwrap();
    healthy(channel).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_while_old_ones_keep_working() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = ServerFiles::new(&old_ca.server("before"), None);
    let server = common::start(&files.args()).await;
    let before = tls_channel(server.addr, &old_ca, None).await.unwrap();
    healthy(before.clone()).await.unwrap();

    // cert-manager rewrites both files in place; a poll may see the new key with the old
    // certificate, which must keep the old configuration rather than fail or serve a mismatch.
    let rotated = new_ca.server("after");
    files.key.write(&rotated.key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    files.cert.write(&rotated.cert);

    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(channel) = tls_channel(server.addr, &new_ca, None).await {
            healthy(channel.clone())
                .await
                .expect("served with the new certificate");
            echo_through(channel, "after-rotation").await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections no longer get the old certificate...
    assert!(tls_channel(server.addr, &old_ca, None).await.is_err());
    // ...while the connection made before the rotation goes on (a reconnect would fail: the
    // channel trusts the old CA only).
    healthy(before.clone())
        .await
        .expect("old connection still served");
    echo_through(before, "old-connection").await;
    server.stop().await;
}

#[tokio::test]
async fn tls_files_that_do_not_make_a_configuration_stop_the_server_at_start() {
    let ca = Ca::new("CA");
    let (one, two) = (ca.server("one"), ca.server("two"));
    let mismatched = ServerFiles::new(
        &Pair {
            cert: one.cert.clone(),
            key: two.key.clone(),
        },
        None,
    );
    let not_pem = SecretFile::new("not a certificate");
    let key = SecretFile::new(&one.key);
    let cases: [Vec<&str>; 3] = [
        mismatched.args(),
        vec![
            "--tls-cert-file",
            not_pem.path(),
            "--tls-key-file",
            key.path(),
        ],
        vec![
            "--tls-cert-file",
            mismatched.cert.path(),
            "--tls-key-file",
            key.path(),
            "--tls-client-ca-file",
            not_pem.path(),
        ],
    ];
    for args in cases {
        let mut argv = vec!["sandbox-runner", "--host", "127.0.0.1"];
        argv.extend(&args);
        let config = <Config as clap::Parser>::try_parse_from(argv).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            sandbox_runner::run(listener, config, std::future::pending()),
        )
        .await
        .expect("refused at once, not served");
        let error = outcome
            .expect_err("bad TLS files were accepted")
            .to_string();
        assert!(error.contains("TLS"), "{error}");
    }
    // The binary says so before serving: invalid configuration, exit 64.
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-runner"))
        .args(mismatched.args())
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(checked.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&checked.stderr).contains("TLS"));
    // A key without a certificate is a usage error of the flags.
    let parsed =
        <Config as clap::Parser>::try_parse_from(["sandbox-runner", "--tls-key-file", key.path()]);
    assert!(parsed.is_err());
}

#[tokio::test]
async fn the_cli_speaks_mtls() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = ServerFiles::new(&server_ca.server("server"), Some(&client_ca));
    let server = common::start(&files.args()).await;
    let ca_file = SecretFile::new(&server_ca.pem());
    let bob = client_ca.client("bob");
    let (cert, key) = (SecretFile::new(&bob.cert), SecretFile::new(&bob.key));
    let addr = format!("https://localhost:{}", server.addr.port());

    let run = |extra: Vec<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-runner"));
        command
            .args(["exec", "--addr", &addr, "--ca-file", ca_file.path()])
            .args(extra)
            .args(["--", "sh", "-c", "printf 'hi\\n'"])
            .env_remove("SANDBOX_RUNNER_ADDR")
            .env_remove("SANDBOX_RUNNER_TOKEN");
        async move {
            tokio::task::spawn_blocking(move || command.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let served = run(vec!["--cert-file", cert.path(), "--key-file", key.path()]).await;
    assert_eq!(
        served.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert_eq!(served.stdout, b"hi\n");
    // Without the client certificate: a service error (125), and no output.
    let refused = run(vec![]).await;
    assert_eq!(refused.status.code(), Some(125));
    assert!(refused.stdout.is_empty());
    server.stop().await;
}
