//! Discovery and access: standard gRPC health, server reflection, the typed Health RPC and
//! bearer-token authentication.

mod common;

use common::shell;
use sandbox_runner::proto::{self as pb, sandbox_service_client::SandboxServiceClient};
use tokio_stream::StreamExt;
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

const SERVICE: &str = "sandbox.v1.SandboxService";

#[tokio::test]
async fn grpc_health_reports_serving_for_the_server_and_the_service() {
    let server = common::start(&[]).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", SERVICE] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_and_describe_the_service() {
    let server = common::start(&[]).await;
    let channel = server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = tokio_stream::iter([
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(SERVICE.into()),
            ),
        },
    ]);
    let mut replies = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = replies.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        panic!("not a list response: {listed:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&SERVICE), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let described = replies.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        described.message_response
    else {
        panic!("not a descriptor response: {described:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // grpcurl 1.8 speaks v1alpha.
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let mut replies = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = format!("{:?}", replies.next().await.unwrap().unwrap());
    assert!(listed.contains(SERVICE), "{listed}");
    server.stop().await;
}

#[tokio::test]
async fn health_rpc_reports_the_instance() {
    let server = common::start(&["--max-concurrent-jobs", "7"]).await;
    let mut client = server.client().await;
    let health = common::health(&mut client).await;
    assert_eq!(health.status, pb::ServingStatus::Ok as i32);
    assert_eq!(health.active_jobs, 0);
    assert_eq!(health.max_concurrent_jobs, 7);
    assert_eq!(health.backend, "local");
    assert!(!health.daytona_configured);
    assert!(!health.convex_configured);
    assert!(health.sinks.is_empty());
    assert!(health.time.is_some() && health.uptime.is_some());
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.output_budget_bytes, 64 << 20, "the default budget");
    assert_eq!(
        health.output_budget_in_use_bytes, 0,
        "nothing held while idle"
    );
    server.stop().await;
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn tokens_guard_the_service_but_not_probes_or_reflection() {
    let server = common::start(&["--auth-tokens", "old-token,new-token"]).await;
    let channel = server.channel().await;
    let mut client = SandboxServiceClient::new(channel.clone());

    for token in [None, Some("wrong"), Some("old-token-but-longer")] {
        let err = client
            .exec(with_token(shell("true"), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        let err = client
            .health(with_token(pb::HealthRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        let err = client
            .status(with_token(pb::StatusRequest { job_id: "x".into() }, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    for token in ["old-token", "new-token"] {
        let stream = client
            .exec(with_token(shell("echo authorized"), Some(token)))
            .await
            .unwrap()
            .into_inner();
        let run = common::Job::from_stream(stream).await.finish().await;
        assert_eq!(run.stdout, b"authorized\n");
    }

    let mut health = HealthClient::new(channel.clone());
    let reply = health
        .check(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, ServingStatus::Serving as i32);
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    }]);
    let mut replies = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    assert!(replies.next().await.unwrap().is_ok());
    server.stop().await;
}

#[tokio::test]
async fn draining_refuses_new_jobs_and_flips_health() {
    let server = common::start(&["--drain-grace", "10s"]).await;
    let channel = server.channel().await;
    let mut client = SandboxServiceClient::new(channel.clone());
    // A running job keeps the server draining while we look.
    let job = common::Job::start(&mut client, shell("sleep 1")).await;
    let stop = tokio::spawn(server.stop());

    common::wait_not_serving(&channel).await;
    let err = client.exec(shell("true")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let report = common::health(&mut client).await;
    assert_eq!(report.status, pb::ServingStatus::Draining as i32);

    // The running job finishes normally within the grace.
    let run = job.finish().await;
    assert_eq!(run.state(), common::JobState::Succeeded);
    stop.await.unwrap();
}

#[tokio::test]
async fn shutdown_cancels_jobs_that_outlive_the_grace() {
    let server = common::start(&["--drain-grace", "200ms", "--cancel-grace", "200ms"]).await;
    let mut client = server.client().await;
    let job = common::Job::start(&mut client, shell("sleep 1000 & sleep 1000; wait")).await;
    let pgid = job.pid;
    let stop = tokio::spawn(server.stop());
    let run = job.finish().await;
    assert_eq!(run.state(), common::JobState::Cancelled);
    assert!(
        run.exited.message.contains("shutting down"),
        "{}",
        run.exited.message
    );
    common::assert_group_gone(pgid).await;
    stop.await.unwrap();
}
