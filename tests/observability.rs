//! `deploy/observability/`: the Grafana dashboard parses and every panel queries something; the
//! alerting rules have the standard shape (and, when promtool is installed, pass `promtool check
//! rules` and the unit tests of alerts.test.yaml); and every metric either one queries is one the server really exports, found by
//! scraping servers (local with the Convex fake, Daytona's fake) that ran jobs exercising every
//! metric. The other way round too: every metric the server exports has a panel.

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
    process::Command,
    time::Duration,
};

use common::{
    Job,
    scrape::{Scrape, free_port, wait_for},
    shell,
};
use sandbox_runner::{
    proto as pb,
    testing::{
        convex_ingest::{FakeIngest, Fault},
        daytona::FakeDaytona,
    },
};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tokio::io::AsyncReadExt;

const DASHBOARD: &str = "deploy/observability/grafana-dashboard.json";
const RULES: &str = "deploy/observability/alerts.yaml";
const RULE_TESTS: &str = "deploy/observability/alerts.test.yaml";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- PromQL: which identifiers of an expression are metric names ----

/// Words that are PromQL's own, not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a list of label names in parentheses.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers that are neither functions (an
/// identifier before `(`), keywords, label names (in `{...}` or a `by (...)` list), durations
/// (`[...]`, numbers with units) nor strings. Fails on unbalanced brackets or open strings.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut depth = 0i32;
    let mut i = 0;
    let skip_spaces = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    // The index after the bracket closing the one at `open`, strings inside skipped.
    let close = |open: usize, end: char| -> Result<usize, String> {
        let mut i = open + 1;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => i = skip_string(&chars, i)?,
                c if c == end => return Ok(i + 1),
                _ => i += 1,
            }
        }
        Err(format!("no `{end}` closes the bracket at {open}: {expr}"))
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '{' {
            i = close(i, '}')?;
        } else if c == '[' {
            i = close(i, ']')?;
        } else if c == '(' {
            depth += 1;
            i += 1;
        } else if c == ')' {
            depth -= 1;
            if depth < 0 {
                return Err(format!("unbalanced `)`: {expr}"));
            }
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration (`5m`, `1e3`, `0.99`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable outside a string or range.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_spaces(i);
            if LABEL_LISTS.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = close(next, ')')?;
                }
            } else if KEYWORDS.contains(&word.as_str()) || chars.get(next) == Some(&'(') {
                // An operator, or a function's name.
            } else {
                names.push(word);
            }
        } else if "+-*/%^=!<>,".contains(c) {
            i += 1;
        } else {
            return Err(format!("unexpected `{c}` in {expr}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced `(`: {expr}"));
    }
    Ok(names)
}

/// The index after the string starting at `open`.
fn skip_string(chars: &[char], open: usize) -> Result<usize, String> {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unterminated string at {open}"))
}

#[test]
fn metric_names_are_told_from_functions_labels_and_durations() {
    let names = |e: &str| metric_names(e).unwrap();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, backend) (rate(x_seconds_bucket{instance=~"$instance",a="b(c}"}[$__rate_interval])))"#
        ),
        ["x_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum by (instance) (q) > 0 unless sum without (job) (increase(d_total[10m] offset 5m)) > 0"
        ),
        ["q", "d_total"]
    );
    assert_eq!(
        names("a / on (instance) group_left (pod) b and bool c * 1e3"),
        ["a", "b", "c"]
    );
    assert!(metric_names("sum(rate(a[5m])").is_err());
    assert!(metric_names(r#"a{b="c}"#).is_err());
    assert!(metric_names("a[5m").is_err());
}

// ---- the dashboard ----

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's PromQL expressions (panel targets and variable queries), checked on the way.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus");
    let defined: HashSet<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let uses_datasource = |v: &Json| {
        let uid = v["datasource"]["uid"].as_str().unwrap_or_default();
        uid == format!("${{{}}}", datasource["name"].as_str().unwrap())
    };

    let mut exprs = Vec::new();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert!(uses_datasource(variable), "{variable}");
        // label_values(metric, label): the metric is queried too.
        let query = variable["query"]["query"].as_str().expect("a query");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("not label_values(metric, label): {query}"));
        exprs.push(inner.0.to_owned());
    }
    let mut ids = HashSet::new();
    let mut queried_panels = 0;
    for panel in panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "duplicate id: {panel}"
        );
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(uses_datasource(panel), "{}", panel["title"]);
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} queries nothing", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "{}: a target without expr",
                panel["title"]
            );
            // Every variable used is defined (or one of Grafana's own, `$__...`).
            for var in expr.split('$').skip(1) {
                let name: String = var
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || defined.contains(name.as_str()),
                    "${name} is not a variable of the dashboard: {expr}"
                );
            }
            exprs.push(expr.to_owned());
        }
        queried_panels += 1;
    }
    assert!(queried_panels >= 20, "{queried_panels} panels");
    exprs
}

// ---- the rules ----

/// A Prometheus duration: one or more `<number><unit>`.
fn is_duration(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        let Some(unit) = unit else { return false };
        rest = &rest[unit.len()..];
    }
    !s.is_empty()
}

/// The rules' expressions, after checking each group and rule has the fields alerting needs.
fn rule_exprs() -> Vec<String> {
    let rules: Yaml = serde_yaml_ng::from_str(&read(RULES)).expect("the rules are YAML");
    let groups = rules["groups"].as_sequence().expect("groups:");
    assert!(!groups.is_empty());
    let mut alerts = HashSet::new();
    let mut exprs = Vec::new();
    for group in groups {
        let name = group["name"].as_str().expect("a group name");
        let rules = group["rules"].as_sequence().expect("rules:");
        assert!(!rules.is_empty(), "group {name} has no rules");
        for rule in rules {
            let keys: BTreeSet<&str> = rule
                .as_mapping()
                .expect("a rule is a mapping")
                .keys()
                .map(|k| k.as_str().expect("string keys"))
                .collect();
            let known = [
                "alert",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            ];
            assert!(keys.iter().all(|k| known.contains(k)), "{keys:?}");
            let alert = rule["alert"].as_str().expect("alert:");
            assert!(
                alert.starts_with(char::is_uppercase)
                    && alert.chars().all(|c| c.is_ascii_alphanumeric()),
                "{alert}"
            );
            assert!(alerts.insert(alert.to_owned()), "{alert} twice");
            let expr = rule["expr"].as_str().expect("expr:");
            assert!(!expr.trim().is_empty(), "{alert}");
            let for_ = rule["for"].as_str().unwrap_or_default();
            assert!(is_duration(for_), "{alert}: for: {for_:?}");
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{alert}: severity {severity:?}"
            );
            for annotation in ["summary", "description"] {
                let text = rule["annotations"][annotation].as_str().unwrap_or_default();
                assert!(!text.trim().is_empty(), "{alert}: no {annotation}");
            }
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

#[test]
fn durations_are_checked() {
    assert!(is_duration("5m") && is_duration("1h30m") && is_duration("500ms"));
    assert!(!is_duration("") && !is_duration("5") && !is_duration("m5") && !is_duration("5 m"));
}

/// promtool, when installed (`PROMTOOL`, or on the PATH).
fn promtool() -> Option<String> {
    let tool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let found = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some(tool)
}

/// Runs promtool with `args` (paths relative to the repository), failing with its output.
fn run_promtool(promtool: &str, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        eprintln!("promtool is not installed: the rules are only parsed by this test's checks");
        return;
    };
    run_promtool(&promtool, &["check", "rules", RULES]);
    // Each alert of alerts.test.yaml fires for the instance that should alert, and only it.
    run_promtool(&promtool, &["test", "rules", RULE_TESTS]);
}

// ---- what the server exports ----

/// The names a scrape has samples of, checked against `queried`: a name ending `_bucket`,
/// `_sum` or `_count` must be one of a histogram's series, anything else a sample of its own.
fn unexported<'a>(scrape: &Scrape, queried: &'a BTreeSet<String>) -> Vec<&'a str> {
    let samples = scrape.sample_names();
    let types = scrape.types();
    queried
        .iter()
        .filter(|name| {
            let histogram_series = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| types.get(base) == Some(&"histogram"))
            });
            let plain = types.get(name.as_str()).is_some_and(|t| *t != "histogram");
            !(samples.contains(name.as_str()) && (histogram_series || plain))
        })
        .map(String::as_str)
        .collect()
}

const SECRET: &str = "test-ingest-secret-0123456789";
const SANDBOX: &str = "sbx-observability";

type Client = pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>;

fn mirrored(command: &str, session: &str) -> pb::ExecRequest {
    let mut req = shell(command);
    req.task_id = "task-1".into();
    req.session_id = session.into();
    req
}

/// Runs a mirrored job and waits (bounded) until its mirror completed.
async fn run_mirrored(client: &mut Client, command: &str, session: &str) {
    let run = common::run(client, mirrored(command, session)).await;
    for _ in 0..3000 {
        let status = common::status(client, &run.job_id).await;
        if status.mirror.expect("mirrored").complete {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the mirror of {session} never completed");
}

/// Runs jobs that move every metric: RPCs and REST, jobs that succeed, fail and fail to start,
/// stdin, a gap, a wait for output budget, a connection that never speaks, mirror deliveries,
/// a retry and a refused record, Daytona requests. Returns the metrics port.
async fn exercise() -> (u16, Vec<common::TestServer>, FakeIngest, FakeDaytona) {
    let ingest = FakeIngest::start(SECRET).await;
    let site_url = ingest.site_url();
    let port = free_port();
    let port_arg = port.to_string();
    let local = common::start(&[
        "--metrics-port",
        &port_arg,
        "--convex-site-url",
        &site_url,
        "--convex-ingest-secret",
        SECRET,
        "--convex-request-timeout",
        "500ms",
        "--output-budget-bytes",
        "1048576",
        "--output-reserve-bytes",
        "4096",
        "--handshake-timeout",
        "200ms",
    ])
    .await;
    let mut client = local.client().await;

    // The mirror: delivered, retried after a 500, refused with a 400 (its output dropped).
    run_mirrored(&mut client, "printf hello; exit 3", "s-ok").await;
    ingest.set_fault(Fault::Status(500));
    let job = Job::start(&mut client, mirrored("printf retried", "s-500")).await;
    ingest.wait_faulted(1, Duration::from_secs(60)).await;
    ingest.set_fault(Fault::None);
    job.finish().await;
    ingest.set_fault(Fault::Status(400));
    run_mirrored(&mut client, "printf refused", "s-400").await;
    ingest.set_fault(Fault::None);

    // Stdin.
    let mut req = shell("cat");
    req.stdin = true;
    let job = Job::start(&mut client, req).await;
    common::send_input(&mut client, &job.job_id, b"abc", None)
        .await
        .unwrap();
    common::close_input(&mut client, &job.job_id).await.unwrap();
    assert_eq!(job.finish().await.stdout, b"abc");

    // A caller that reads nothing while the job writes 8 MB: the job waits for budget.
    let job = Job::start(&mut client, shell("head -c 8000000 /dev/zero")).await;
    wait_for(port, "a wait for output budget", |s| {
        s.sum("sandbox_output_budget_waits_total", &[]) > 0.0
    })
    .await;
    job.finish().await;

    // REST, and a connection that never speaks HTTP/2.
    let health = reqwest::get(format!("http://{}/health", local.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let mut mute = tokio::net::TcpStream::connect(local.addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(30), mute.read(&mut [0u8; 64])).await;
    assert!(
        closed.is_ok(),
        "the server closes a connection that never speaks"
    );

    // A gap: the start of a finished job's log is gone when a watcher asks for it.
    let small_log = common::start(&["--job-log-events", "16"]).await;
    let mut small = small_log.client().await;
    let run = common::run(
        &mut small,
        shell("for i in $(seq 40); do echo $i; sleep 0.005; done"),
    )
    .await;
    let stream = common::attach(&mut small, &run.job_id, None, pb::GapPolicy::Report, false)
        .await
        .unwrap();
    let watched = Job::resume(stream, None, [0, 0]).await.finish().await;
    assert!(!watched.gaps.is_empty(), "the watcher was told of a gap");

    // Daytona: a job, and one in a sandbox that does not exist (it fails to start).
    let daytona = FakeDaytona::start(common::DAYTONA_KEY).await;
    daytona.add_sandbox(SANDBOX, "started");
    let remote = common::start_daytona(&daytona, &[]).await;
    let mut remote_client = remote.client().await;
    let mut req = shell("echo hi");
    req.sandbox_id = SANDBOX.into();
    assert_eq!(common::run(&mut remote_client, req).await.stdout, b"hi\n");
    let mut req = shell("true");
    req.sandbox_id = "sbx-missing".into();
    remote_client.exec(req).await.expect_err("no such sandbox");

    (port, vec![local, small_log, remote], ingest, daytona)
}

#[tokio::test]
async fn every_metric_the_dashboard_and_rules_query_is_exported_and_has_a_panel() {
    let dashboard: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| metric_names(e).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}")))
        .collect();
    let rules: BTreeSet<String> = rule_exprs()
        .iter()
        .flat_map(|e| metric_names(e).unwrap_or_else(|e| panic!("{RULES}: {e}")))
        .collect();

    let (port, servers, _ingest, _daytona) = exercise().await;
    // The last counters move after the jobs' ends: scrape again (bounded) until every name
    // shows, then name any that never did.
    let mut scrape = Scrape::get(port).await;
    for _ in 0..250 {
        if unexported(&scrape, &dashboard).is_empty() && unexported(&scrape, &rules).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        scrape = Scrape::get(port).await;
    }
    assert_eq!(
        unexported(&scrape, &dashboard),
        Vec::<&str>::new(),
        "{DASHBOARD} queries metrics the server does not export"
    );
    assert_eq!(
        unexported(&scrape, &rules),
        Vec::<&str>::new(),
        "{RULES} query metrics the server does not export"
    );

    // Every metric the server exports has a panel (a histogram: through any of its series).
    let missing: Vec<&str> = scrape
        .types()
        .into_iter()
        .filter(|(name, kind)| {
            let series = match *kind {
                "histogram" => vec![
                    format!("{name}_bucket"),
                    format!("{name}_sum"),
                    format!("{name}_count"),
                ],
                _ => vec![name.to_string()],
            };
            !series.iter().any(|s| dashboard.contains(s))
        })
        .map(|(name, _)| name)
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
    for server in servers {
        server.stop().await;
    }
}
