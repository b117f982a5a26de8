//! The REST face on the gRPC port: the Node runner's routes with its JSON shapes and error
//! codes, over HTTP/1.1 and h2c, sharing the job table with gRPC; and a job's events as
//! Server-Sent Events, resumed with `Last-Event-ID`. Real server, real HTTP client.

mod common;

use std::time::Duration;

use common::{Job, shell};
use reqwest::{Client, StatusCode};
use sandbox_runner::proto as pb;
use serde_json::{Value, json};

fn http1() -> Client {
    sandbox_runner::tls::install_crypto_provider();
    Client::builder().http1_only().build().unwrap()
}

fn h2c() -> Client {
    sandbox_runner::tls::install_crypto_provider();
    Client::builder().http2_prior_knowledge().build().unwrap()
}

async fn post(client: &Client, url: String, body: Value) -> (StatusCode, Value) {
    let response = client.post(url).json(&body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn get(client: &Client, url: String) -> (StatusCode, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Polls the REST status of a job (bounded) until it is no longer running.
async fn wait_done(client: &Client, base: &str, job_id: &str) -> Value {
    for _ in 0..500 {
        let (code, status) = get(client, format!("{base}/v1/status/{job_id}")).await;
        assert_eq!(code, StatusCode::OK, "{status}");
        if status["status"] != "running" {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {job_id} still running");
}

#[tokio::test]
async fn the_node_runners_routes_answer_with_its_shapes_over_http1_and_h2c() {
    let server = common::start(&[]).await;
    let base = format!("http://{}", server.addr);
    for client in [http1(), h2c()] {
        let (code, started) = post(
            &client,
            format!("{base}/v1/exec"),
            json!({
                "taskId": "task-1",
                "sessionId": "terminal-1",
                "sandboxId": "local",
                "command": "printf \"$GREETING from $(pwd)\"; exit 3",
                "cwd": "/tmp",
                "env": { "GREETING": "hello" }
            }),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{started}");
        assert_eq!(started["sessionId"], "terminal-1");
        assert_eq!(started["status"], "running");
        let job_id = started["jobId"].as_str().unwrap().to_owned();

        // The job does not depend on the request: it ends on its own, with its real exit code
        // and the output its cwd and env made.
        let status = wait_done(&client, &base, &job_id).await;
        assert_eq!(status["status"], "failed");
        assert_eq!(status["exitCode"], 3);
        assert_eq!(status["taskId"], "task-1");
        assert_eq!(status["sandboxId"], "local");
        assert_eq!(status["stdoutBytes"], "hello from /tmp".len());
        assert!(status["startedAt"].as_u64().unwrap() > 1_700_000_000_000);

        // The same job through gRPC.
        let mut grpc = server.client().await;
        let seen = common::status(&mut grpc, &job_id).await;
        assert_eq!(seen.exit_code, Some(3));
        assert_eq!(seen.session_id, "terminal-1");

        let (code, health) = get(&client, format!("{base}/health")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(health["status"], "ok");
        assert_eq!(health["daytonaConfigured"], false);
        assert_eq!(health["convexConfigured"], false);
        assert!(health["activeJobs"].is_u64() && health["timestamp"].is_u64());
    }
    server.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_job_whichever_protocol_started_it() {
    let server = common::start(&[]).await;
    let base = format!("http://{}", server.addr);
    let client = http1();
    let (_, started) = post(
        &client,
        format!("{base}/v1/exec"),
        json!({ "sessionId": "s", "command": "sleep 60" }),
    )
    .await;
    let job_id = started["jobId"].as_str().unwrap();
    let (code, cancelled) = post(
        &client,
        format!("{base}/v1/cancel"),
        json!({ "jobId": job_id }),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled, json!({ "jobId": job_id, "status": "cancelled" }));
    assert_eq!(
        wait_done(&client, &base, job_id).await["status"],
        "cancelled"
    );

    // A job started over gRPC, cancelled over REST.
    let mut grpc = server.client().await;
    let job = Job::start(
        &mut grpc,
        pb::ExecRequest {
            on_disconnect: pb::DisconnectPolicy::Detach as i32,
            ..shell("sleep 60")
        },
    )
    .await;
    let (code, _) = post(
        &client,
        format!("{base}/v1/cancel"),
        json!({ "jobId": job.job_id }),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        job.finish().await.state(),
        common::JobState::Cancelled,
        "the gRPC stream saw it end"
    );
    // Cancelling a finished job says how it ended.
    let (_, again) = post(
        &client,
        format!("{base}/v1/cancel"),
        json!({ "jobId": job_id }),
    )
    .await;
    assert_eq!(again["status"], "cancelled");
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_their_status() {
    let server = common::start(&[]).await;
    let base = format!("http://{}", server.addr);
    let client = http1();
    let cases = [
        (json!({ "sessionId": "s" }), "command"),
        (json!({ "command": "   " }), "blank"),
        (json!({ "command": "true", "env": { "A=B": "x" } }), "'='"),
        (json!({ "command": "true", "cwd": "/no/such/dir" }), "cwd"),
    ];
    for (body, says) in cases {
        let (code, error) = post(&client, format!("{base}/v1/exec"), body.clone()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert!(
            error["error"].as_str().unwrap().contains(says),
            "{body}: {error}"
        );
    }
    let response = client
        .post(format!("{base}/v1/exec"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.json::<Value>().await.unwrap()["error"].is_string());

    let (code, error) = get(&client, format!("{base}/v1/status/j1.nope.nope")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{error}");
    let (code, error) = get(&client, format!("{base}/no/such/route")).await;
    assert_eq!(
        (code, error["error"].is_string()),
        (StatusCode::NOT_FOUND, true)
    );
    let (code, error) = get(&client, format!("{base}/v1/exec")).await;
    assert_eq!(
        (code, error["error"].is_string()),
        (StatusCode::METHOD_NOT_ALLOWED, true)
    );
    server.stop().await;
}

#[tokio::test]
async fn with_a_token_set_rest_calls_need_it_and_health_does_not() {
    let tokens = common::SecretFile::new("s3cret\n");
    let server = common::start(&["--auth-tokens-file", tokens.path()]).await;
    let base = format!("http://{}", server.addr);
    let client = http1();
    let (code, error) = post(
        &client,
        format!("{base}/v1/exec"),
        json!({ "command": "true" }),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{error}");
    let response = client
        .post(format!("{base}/v1/exec"))
        .bearer_auth("wrong")
        .json(&json!({ "command": "true" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client
        .post(format!("{base}/v1/exec"))
        .bearer_auth("s3cret")
        .json(&json!({ "command": "true" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (code, _) = get(&client, format!("{base}/health")).await;
    assert_eq!(code, StatusCode::OK);
    server.stop().await;
}

/// One Server-Sent Event: its name, id and JSON data.
#[derive(Debug)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// Reads events from an event stream until `stop` says so or the stream ends (bounded by the
/// test's own timeout); keepalive comments are skipped.
async fn read_events(
    response: &mut reqwest::Response,
    mut stop: impl FnMut(&Sse) -> bool,
) -> Vec<Sse> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = Sse {
                event: String::new(),
                id: None,
                data: Value::Null,
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.event = name.into();
                } else if let Some(id) = line.strip_prefix("id: ") {
                    event.id = Some(id.parse().unwrap());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data = serde_json::from_str(data).unwrap();
                }
            }
            if event.event.is_empty() {
                continue;
            }
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
    events
}

#[tokio::test]
async fn event_streams_resume_after_last_event_id_with_nothing_lost_or_repeated() {
    let server = common::start(&[]).await;
    let base = format!("http://{}", server.addr);
    let client = http1();
    // Output in steps, so the first connection can leave mid-job.
    let (_, started) = post(
        &client,
        format!("{base}/v1/exec"),
        json!({ "command": "for i in 1 2 3 4 5 6; do echo \"line $i é\"; sleep 0.1; done; printf '\\377'" }),
    )
    .await;
    let job_id = started["jobId"].as_str().unwrap().to_owned();
    let url = format!("{base}/v1/jobs/{job_id}/events");

    let mut first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let before = read_events(&mut first, |e| {
        e.event == "output" && e.data["text"].as_str().unwrap().contains("line 2")
    })
    .await;
    drop(first);
    assert_eq!(before[0].event, "started");
    let last = before.last().unwrap().id.unwrap();

    let mut second = client
        .get(&url)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let after = read_events(&mut second, |_| false).await;
    assert_eq!(after.last().unwrap().event, "exited", "{after:?}");
    assert_eq!(after.last().unwrap().data["exitCode"], 0);

    // Every seq once, in order; the bytes of both connections are the job's.
    let seqs: Vec<u64> = before.iter().chain(&after).map(|e| e.id.unwrap()).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    let mut stdout = Vec::new();
    for event in before.iter().chain(&after).filter(|e| e.event == "output") {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(event.data["data"].as_str().unwrap())
            .unwrap();
        // Text only when the bytes are UTF-8.
        assert_eq!(
            event.data["text"].as_str(),
            std::str::from_utf8(&bytes).ok(),
            "{event:?}"
        );
        stdout.extend(bytes);
    }
    let mut expected: Vec<u8> = (1..=6)
        .flat_map(|i| format!("line {i} é\n").into_bytes())
        .collect();
    expected.push(0xff);
    assert_eq!(stdout, expected);

    // Reconnecting after `exited` is 204: EventSource stops there.
    let exited = after.last().unwrap().id.unwrap();
    let done = client
        .get(&url)
        .header("Last-Event-ID", exited.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    let bad = client
        .get(&url)
        .header("Last-Event-ID", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}
