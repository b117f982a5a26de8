//! Drift checks between deploy/ and the binary: the rendered Kubernetes manifests and the
//! Dockerfile must use ports, probe service names, environment variables and values that the
//! binary really accepts. Renders with `kubectl kustomize` when it is installed; otherwise
//! applies the overlay's patch itself (env merged by name), so the check runs everywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use clap::CommandFactory;
use sandbox_runner::{
    Config, grpc::service::SandboxApi, proto::sandbox_service_server::SandboxServiceServer,
};
use serde::Deserialize;
use serde_json::Value;
use tonic::server::NamedService;

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");
/// Where the image puts the binary (deploy/Dockerfile).
const IMAGE_BIN: &str = "/usr/local/bin/sandbox-runner";
const SERVICE: &str = <SandboxServiceServer<SandboxApi> as NamedService>::NAME;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn read_docs(path: &Path) -> Vec<Value> {
    parse_docs(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Renders a kustomization with `kubectl kustomize`, when kubectl is installed.
fn render_with_kubectl(dir: &str) -> Option<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(parse_docs(&String::from_utf8(out.stdout).unwrap()))
}

/// Renders a kustomization without kubectl: base files plus the overlay's strategic-merge patch
/// of the container (env merged by name, other keys replaced). Enough for these manifests.
fn render(dir: &str) -> Vec<Value> {
    let path = root().join(dir);
    let kustomization = &read_docs(&path.join("kustomization.yaml"))[0];
    let mut docs = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        let resource = resource.as_str().unwrap();
        let target = path.join(resource);
        if target.is_dir() {
            docs.extend(render(&format!("{dir}/{resource}")));
        } else {
            docs.extend(read_docs(&target));
        }
    }
    for patch in kustomization["patches"].as_array().into_iter().flatten() {
        let patch = &read_docs(&path.join(patch["path"].as_str().unwrap()))[0];
        let deployment = docs
            .iter_mut()
            .find(|d| {
                d["kind"] == "Deployment" && d["metadata"]["name"] == patch["metadata"]["name"]
            })
            .expect("patch targets a deployment");
        let patched_pod = &patch["spec"]["template"]["spec"];
        let pod = &mut deployment["spec"]["template"]["spec"];
        for (key, value) in patched_pod.as_object().unwrap() {
            match key.as_str() {
                "containers" => {}
                "volumes" => merge_by(pod[key].as_array_mut().unwrap(), value, "name"),
                _ => pod[key] = value.clone(),
            }
        }
        for patched in patched_pod["containers"].as_array().unwrap() {
            let containers = deployment["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap();
            let container = containers
                .iter_mut()
                .find(|c| c["name"] == patched["name"])
                .unwrap();
            for (key, value) in patched.as_object().unwrap() {
                match key.as_str() {
                    "env" => merge_by(container[key].as_array_mut().unwrap(), value, "name"),
                    "volumeMounts" => {
                        merge_by(container[key].as_array_mut().unwrap(), value, "mountPath")
                    }
                    // A probe's handler is replaced (`grpc: null` drops the base's).
                    _ => container[key] = without_nulls(value),
                }
            }
        }
    }
    docs
}

/// A list merged as a strategic-merge patch does: items matched by `key`, the patch's win.
fn merge_by(list: &mut Vec<Value>, patch: &Value, key: &str) {
    for item in patch.as_array().unwrap() {
        list.retain(|existing| existing[key] != item[key]);
        list.push(item.clone());
    }
}

/// `value` without its null fields (a patch's deletions).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn one<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Environment variable names the binary reads.
fn known_env() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    names.insert("RUST_LOG".into());
    names
}

/// Long enough for every secret's minimum.
const STAND_IN_SECRET: &str = "stand-in-secret-value-0123456789abcdef";

/// The files the pod's Secret volumes put in the container (mount path / item path), checking
/// that each such mount is read-only and its files unreadable to other users.
fn mounted_secret_files(pod: &Value, container: &Value) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for mount {mount}"));
        let secrets: Vec<&Value> = if volume["secret"].is_object() {
            vec![&volume["secret"]]
        } else {
            volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|source| source.get("secret"))
                .collect()
        };
        if secrets.is_empty() {
            continue;
        }
        let name = &mount["name"];
        assert_eq!(
            mount["readOnly"], true,
            "secret mount {name} must be read-only"
        );
        assert!(
            mount.get("subPath").is_none(),
            "{name}: subPath mounts are never updated"
        );
        let mode = volume["secret"]["defaultMode"]
            .as_u64()
            .or(volume["projected"]["defaultMode"].as_u64())
            .unwrap_or_else(|| {
                panic!("{name}: set defaultMode (the default, 0644, is world-readable)")
            });
        assert_eq!(
            mode & 0o007,
            0,
            "{name}: defaultMode {mode:o} lets other users read secrets"
        );
        let dir = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
        for secret in secrets {
            for item in secret["items"].as_array().expect("secret items listed") {
                files.insert(format!("{dir}/{}", item["path"].as_str().unwrap()));
            }
        }
    }
    files
}

/// The container's environment with secrets and field refs replaced by stand-ins; a `*_FILE`
/// variable must name a file a Secret volume provides, and is pointed at a stand-in file in
/// `files_dir`.
fn container_env(
    container: &Value,
    mounted: &BTreeSet<String>,
    files_dir: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = var["value"].as_str()
            && name.ends_with("_FILE")
        {
            assert!(
                mounted.contains(v),
                "{name} names {v}, which no Secret volume provides"
            );
            let stand_in = files_dir.join(&name);
            std::fs::create_dir_all(files_dir).unwrap();
            let content = match name.as_str() {
                "TLS_CERT_FILE" | "TLS_KEY_FILE" | "TLS_CLIENT_CA_FILE" => {
                    tls_stand_in(files_dir, &name)
                }
                _ => format!("{STAND_IN_SECRET}\n"),
            };
            std::fs::write(&stand_in, content).unwrap();
            stand_in.to_str().unwrap().to_owned()
        } else if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if var["valueFrom"]["secretKeyRef"].is_object() {
            // Long enough for every secret's minimum; URLs need a scheme.
            if name.ends_with("_URL") {
                "https://example.convex.site".into()
            } else {
                STAND_IN_SECRET.into()
            }
        } else if var["valueFrom"]["fieldRef"].is_object() {
            "sandbox-runner-0".into()
        } else {
            panic!("env {name}: unsupported source {var}");
        };
        env.insert(name, value);
    }
    env
}

/// A certificate, its key or its CA (PEM), of one set made per stand-in directory: the
/// certificate is for localhost, and serves and identifies clients, as the TLS overlay's does.
fn tls_stand_in(files_dir: &Path, var: &str) -> String {
    let set = files_dir.join("tls-set.json");
    if !set.exists() {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
            KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let json = serde_json::json!({
            "TLS_CERT_FILE": cert.pem(),
            "TLS_KEY_FILE": key.serialize_pem(),
            "TLS_CLIENT_CA_FILE": ca.pem(),
        });
        std::fs::write(&set, json.to_string()).unwrap();
    }
    let json: Value = serde_json::from_slice(&std::fs::read(&set).unwrap()).unwrap();
    json[var].as_str().unwrap().to_owned()
}

/// Counts renderings checked, for distinct stand-in directories in parallel tests.
static RENDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A secret comes from a Secret, never from a literal: its variable from a `secretKeyRef`, or
/// its `*_FILE` variable naming a mounted Secret file (checked by `container_env`).
fn assert_from_a_secret(container: &Value, secret: &str) {
    let env = container["env"].as_array().unwrap();
    let find = |name: &str| env.iter().find(|v| v["name"] == name);
    let by_ref = find(secret).is_some_and(|v| v["valueFrom"]["secretKeyRef"].is_object());
    let by_file = find(&format!("{secret}_FILE")).is_some();
    assert!(by_ref || by_file, "{secret} must come from a Secret");
    assert!(
        find(secret).is_none_or(|v| v.get("value").is_none()),
        "{secret} must not be a literal"
    );
}

fn parse_duration_secs(s: &str) -> u64 {
    humantime::parse_duration(s).unwrap().as_secs()
}

fn check_deployment(docs: &[Value], backend: &str) {
    let deployment = one(docs, "Deployment", "sandbox-runner");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sandbox-runner")
        .expect("sandbox-runner container");
    let mounted = mounted_secret_files(pod, container);
    let files_dir = std::env::temp_dir().join(format!(
        "sandbox-runner-deploy-test-{}-{backend}-{}",
        std::process::id(),
        RENDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let env = container_env(container, &mounted, &files_dir);

    // Every variable is one the binary reads, and together they form a valid configuration.
    let known = known_env();
    for name in env.keys() {
        assert!(
            known.contains(name),
            "manifest sets {name}, which the binary does not read"
        );
    }
    // Metrics: the port the binary serves is the container's `metrics` port, and the one the
    // scrape annotations name.
    if let Some(port) = env.get("METRICS_PORT") {
        let declared = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .map(|p| p["containerPort"].as_u64().unwrap().to_string());
        assert_eq!(declared.as_deref(), Some(port.as_str()), "the metrics port");
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], port.as_str());
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let check_config = |env: &BTreeMap<String, String>| {
        Command::new(BIN)
            .env_clear()
            .envs(env)
            .args(&args)
            .arg("--check-config")
            .output()
            .unwrap()
    };
    let mut env_here = env.clone();
    if backend == "local" && !can_switch_users() {
        // The binary checks it can run jobs as JOB_USER; this test process cannot, so it must
        // refuse, naming what it lacks. The rest is checked without a job user.
        let out = check_config(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("CAP_SETUID"), "{stderr}");
        eprintln!("not root: checking the manifest's config without JOB_USER/JOB_GROUP");
        env_here.remove("JOB_USER");
        env_here.remove("JOB_GROUP");
    }
    let out = check_config(&env_here);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "binary rejects the manifest's config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains(&format!("backend {backend}")), "{summary}");
    let _ = std::fs::remove_dir_all(&files_dir);

    for secret in [
        "SANDBOX_RUNNER_TOKEN",
        "JOB_ID_SIGNING_KEY",
        "CONVEX_INGEST_SECRET",
    ] {
        assert_from_a_secret(container, secret);
    }

    // One port everywhere.
    let port: u64 = env["PORT"].parse().unwrap();
    let container_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a port named grpc");
    assert_eq!(container_port["containerPort"], port);
    // Probes: gRPC on the port, or (over TLS, where the kubelet's gRPC probe cannot go) the
    // binary's `health` against it, or TCP for liveness.
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let handlers: Vec<&String> = container[probe].as_object().unwrap().keys().collect();
        let spec = &container[probe];
        if spec["grpc"].is_object() {
            assert_eq!(spec["grpc"]["port"], port, "{probe} port");
        } else if let Some(command) = spec["exec"]["command"].as_array() {
            let command: Vec<&str> = command.iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!(command[..2], [IMAGE_BIN, "health"], "{probe}");
            let addr = command.iter().skip_while(|a| **a != "--addr").nth(1);
            assert_eq!(addr, Some(&format!("https://127.0.0.1:{port}").as_str()));
        } else {
            assert_eq!(probe, "livenessProbe", "{probe}: {handlers:?}");
            assert_eq!(spec["tcpSocket"]["port"], port, "{probe} port");
        }
        let kinds = ["grpc", "exec", "tcpSocket", "httpGet"];
        let count = handlers
            .iter()
            .filter(|h| kinds.contains(&h.as_str()))
            .count();
        assert_eq!(count, 1, "{probe} must have one handler: {handlers:?}");
    }
    // Readiness follows draining: the gRPC probe of the service (not the server's), or
    // `health`, which exits 1 when draining.
    let readiness = &container["readinessProbe"];
    assert!(
        readiness["grpc"]["service"] == SERVICE || readiness["exec"].is_object(),
        "readiness must follow draining"
    );
    let liveness_service = container["livenessProbe"]["grpc"]["service"]
        .as_str()
        .unwrap_or("");
    assert!(liveness_service.is_empty() || liveness_service == SERVICE);

    // Kubernetes must not SIGKILL before the service's bounded drain is over.
    let drain = parse_duration_secs(&env["DRAIN_GRACE"]);
    let cancel = parse_duration_secs(&env["CANCEL_GRACE"]);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > (drain + 3 * cancel + 5) + drain + 5,
        "terminationGracePeriodSeconds {grace} too short"
    );

    // Locked down.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert!(
        security["capabilities"]["drop"]
            .as_array()
            .unwrap()
            .contains(&"ALL".into())
    );
    // Exactly the capabilities the image's binary carries as file capabilities: without them
    // in the bounding set the kernel refuses to run it, and nothing else is needed.
    let mut added: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    added.sort();
    assert_eq!(added, FILE_CAPABILITIES, "capabilities.add");
    // Jobs run as the image's job user, never as the server's.
    let job_user: u64 = env["JOB_USER"].parse().expect("numeric JOB_USER");
    let job_group: u64 = env["JOB_GROUP"].parse().expect("numeric JOB_GROUP");
    let server_user = pod["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_ne!(job_user, server_user, "JOB_USER is the server's own user");
    assert_ne!(job_user, 0);
    let image = dockerfile();
    assert_eq!(
        (job_user, job_group),
        (image.job_user.0, image.job_user.1),
        "JOB_USER/JOB_GROUP vs the user the image creates"
    );
    assert_eq!(server_user, image.user, "runAsUser vs the image's USER");
    for key in ["requests", "limits"] {
        assert!(
            container["resources"][key]["cpu"].is_string(),
            "resources.{key}.cpu"
        );
        assert!(
            container["resources"][key]["memory"].is_string(),
            "resources.{key}.memory"
        );
    }
    // The writable paths the image relies on are volumes.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&env["DEFAULT_CWD"].as_str()) && mounts.contains(&"/tmp"),
        "{mounts:?}"
    );

    for name in ["sandbox-runner", "sandbox-runner-headless"] {
        let service = one(docs, "Service", name);
        let ports = service["spec"]["ports"].as_array().unwrap();
        assert!(
            ports
                .iter()
                .all(|p| p["appProtocol"] == "grpc" && p["targetPort"] == "grpc"),
            "{name}"
        );
    }
    assert_eq!(
        one(docs, "Service", "sandbox-runner-headless")["spec"]["clusterIP"],
        "None"
    );
    one(docs, "PodDisruptionBudget", "sandbox-runner");
    let hpa = one(docs, "HorizontalPodAutoscaler", "sandbox-runner");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
}

/// Both renderings, so the check runs where kubectl is missing and agrees with it where not.
fn renderings(dir: &str) -> Vec<Vec<Value>> {
    let mut all = vec![render(dir)];
    all.extend(render_with_kubectl(dir));
    all
}

#[test]
fn base_manifests_match_the_binary() {
    for docs in renderings("deploy/k8s/base") {
        check_deployment(&docs, "local");
    }
}

#[test]
fn daytona_overlay_matches_the_binary() {
    for docs in renderings("deploy/k8s/overlays/daytona") {
        check_daytona_overlay(&docs);
    }
}

fn check_daytona_overlay(docs: &[Value]) {
    check_deployment(docs, "daytona");
    let deployment = one(docs, "Deployment", "sandbox-runner");
    assert_from_a_secret(
        &deployment["spec"]["template"]["spec"]["containers"][0],
        "DAYTONA_API_KEY",
    );
}

#[tokio::test]
async fn tls_overlay_matches_the_binary_and_its_probes_pass() {
    for docs in renderings("deploy/k8s/overlays/tls") {
        check_deployment(&docs, "local");
        check_tls_overlay(&docs).await;
    }
}

/// The TLS overlay: its files come from the Secret cert-manager writes, with the usages the
/// probes need; and its readiness probe, run against the binary serving those files (stand-ins
/// made here), passes.
async fn check_tls_overlay(docs: &[Value]) {
    let deployment = one(docs, "Deployment", "sandbox-runner");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let certificate = one(docs, "Certificate", "sandbox-runner-tls");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == certificate["spec"]["secretName"])
        .expect("a volume of the certificate's Secret");
    let usages = certificate["spec"]["usages"].as_array().unwrap();
    assert!(usages.contains(&"server auth".into()) && usages.contains(&"client auth".into()));
    let dns_names = certificate["spec"]["dnsNames"].as_array().unwrap();

    let mounted = mounted_secret_files(pod, container);
    let files_dir = std::env::temp_dir().join(format!(
        "sandbox-runner-deploy-tls-{}-{}",
        std::process::id(),
        RENDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut env = container_env(container, &mounted, &files_dir);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap();
    // The manifest's path of each file, and the stand-in written for it.
    let mut stand_ins = BTreeMap::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        if let Some(path) = var["value"].as_str()
            && name.ends_with("_FILE")
        {
            stand_ins.insert(path.to_owned(), env[name].clone());
        }
    }
    for var in ["TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"] {
        let path = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == var)
            .and_then(|v| v["value"].as_str())
            .unwrap_or_else(|| panic!("{var} set"));
        assert!(
            path.starts_with(mount["mountPath"].as_str().unwrap()),
            "{var} comes from the certificate's Secret"
        );
    }

    // The readiness probe against the binary with the overlay's settings.
    env.remove("JOB_USER");
    env.remove("JOB_GROUP");
    env.insert(
        "DEFAULT_CWD".into(),
        std::env::temp_dir().display().to_string(),
    );
    let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = sandbox_runner::testing::server_process::ServerProcess::start(BIN, &[], &envs)
        .await
        .expect("the binary serves the overlay's configuration");
    let port = server.addr.rsplit(':').next().unwrap();
    let command: Vec<String> = container["readinessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| {
            let arg = arg.as_str().unwrap();
            if let Some(stand_in) = stand_ins.get(arg) {
                return stand_in.clone();
            }
            arg.replace(":5100", &format!(":{port}"))
        })
        .collect();
    let server_name = command
        .iter()
        .skip_while(|a| *a != "--tls-server-name")
        .nth(1)
        .expect("the probe names the certificate's name");
    assert!(dns_names.contains(&server_name.as_str().into()));
    let probe = tokio::process::Command::new(BIN)
        .args(&command[1..])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert_eq!(
        probe.status.code(),
        Some(0),
        "readiness probe: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&files_dir);
}

/// Capabilities the image's binary carries (`setcap ...+ep`), as Kubernetes names them.
const FILE_CAPABILITIES: [&str; 3] = ["KILL", "SETGID", "SETUID"];

/// What deploy/Dockerfile says.
struct Dockerfile {
    exposed: Option<String>,
    stop_signal: Option<String>,
    /// `USER`'s uid.
    user: u64,
    builds_with_script: bool,
    /// `ENV` names and values.
    env: BTreeMap<String, String>,
    /// `ENTRYPOINT`'s exec form.
    entrypoint: Vec<String>,
    /// Arguments of `setcap` (capabilities, file).
    setcap: Vec<String>,
    /// (uid, gid) of the `useradd` of JOB_USER.
    job_user: (u64, u64),
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    // Continuation lines joined, comments dropped: one instruction per entry.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() && current.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut image = Dockerfile {
        exposed: None,
        stop_signal: None,
        user: 0,
        builds_with_script: false,
        env: BTreeMap::new(),
        entrypoint: Vec::new(),
        setcap: Vec::new(),
        job_user: (0, 0),
    };
    let mut useradds = Vec::new();
    for instruction in &instructions {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        match words.first().copied() {
            Some("EXPOSE") => image.exposed = Some(words[1].to_owned()),
            Some("STOPSIGNAL") => image.stop_signal = Some(words[1].to_owned()),
            Some("USER") => {
                image.user = words[1]
                    .split(':')
                    .next()
                    .unwrap()
                    .parse()
                    .expect("numeric USER")
            }
            Some("ENV") => {
                for pair in &words[1..] {
                    let (name, value) = pair.split_once('=').expect("ENV name=value");
                    image.env.insert(name.to_owned(), value.to_owned());
                }
            }
            Some("ENTRYPOINT") => {
                let json = instruction.strip_prefix("ENTRYPOINT").unwrap();
                image.entrypoint = serde_json::from_str(json).expect("exec-form ENTRYPOINT");
            }
            Some("RUN") => {
                image.builds_with_script |= words.get(1) == Some(&"deploy/build.sh");
                for command in instruction.split("&&") {
                    let args: Vec<&str> = command.split_whitespace().collect();
                    let args = args.strip_prefix(&["RUN"]).unwrap_or(&args);
                    match args.first().copied() {
                        Some("setcap") => {
                            image.setcap = args[1..].iter().map(|a| a.to_string()).collect()
                        }
                        Some("useradd") => useradds.push(args.to_vec().join(" ")),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let option = |useradd: &str, name: &str| -> u64 {
        let words: Vec<&str> = useradd.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name).unwrap();
        words[at + 1].parse().unwrap()
    };
    let job_uid: u64 = image.env["JOB_USER"].parse().expect("numeric JOB_USER");
    let useradd = useradds
        .iter()
        .find(|u| option(u, "--uid") == job_uid)
        .expect("the image creates JOB_USER");
    image.job_user = (job_uid, option(useradd, "--gid"));
    image
}

#[test]
fn dockerfile_matches_the_binary() {
    let image = dockerfile();
    let default_port = Config::command()
        .get_arguments()
        .find(|a| a.get_id() == "port")
        .and_then(|a| {
            a.get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned())
        })
        .unwrap();
    assert_eq!(
        image.exposed.as_deref(),
        Some(default_port.as_str()),
        "EXPOSE vs the default PORT"
    );
    assert_eq!(image.stop_signal.as_deref(), Some("SIGTERM"));
    assert_ne!(image.user, 0, "image must not run as root");
    assert!(
        image.builds_with_script,
        "the image must build with deploy/build.sh, which CI runs"
    );
    let known = known_env();
    for name in image.env.keys() {
        assert!(
            known.contains(name),
            "Dockerfile sets {name}, which the binary does not read"
        );
    }
    assert!(image.env.contains_key("PORT"), "{:?}", image.env);

    // Jobs run as a user of their own, in its own group.
    let (job_uid, job_gid) = image.job_user;
    assert_ne!(job_uid, image.user, "JOB_USER is the server's own user");
    assert_ne!(job_uid, 0);
    assert_eq!(image.env["JOB_GROUP"], job_gid.to_string());
    // The binary is the entrypoint itself: under no_new_privs, file capabilities reach only the
    // process the container runtime starts, not one an init wrapper starts.
    assert_eq!(
        image.entrypoint.first().map(String::as_str),
        Some(IMAGE_BIN),
        "ENTRYPOINT"
    );
    let mut caps: Vec<String> = image
        .setcap
        .first()
        .expect("setcap on the binary")
        .strip_suffix("+ep")
        .expect("permitted and effective")
        .split(',')
        .map(|c| c.trim_start_matches("cap_").to_uppercase())
        .collect();
    caps.sort();
    assert_eq!(caps, FILE_CAPABILITIES);
    assert_eq!(image.setcap.get(1).map(String::as_str), Some(IMAGE_BIN));
}

/// Whether this process may run processes as another user and signal them (what
/// `--job-user` needs).
fn can_switch_users() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7).
    caps & 0xe0 == 0xe0
}
