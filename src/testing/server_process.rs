//! The real `sandbox-runner` binary as a child process: for tests of what only the binary does
//! (signals, configuration errors, logs), and for the benchmark, which reads the server's memory
//! and CPU from /proc apart from its own. It listens on 127.0.0.1:0 with JSON logs on stderr;
//! its address comes from the `listening` log line.

use std::{
    ffi::OsStr,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::Context;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tonic::transport::Channel;

/// A running server binary. Dropping it kills the process.
pub struct ServerProcess {
    child: Child,
    /// Its process id (still known after it exited).
    pub pid: u32,
    /// Where it listens: `127.0.0.1:PORT`.
    pub addr: String,
    /// Log lines not read yet; `None` once they are echoed instead (see `echo_warnings`).
    logs: Option<mpsc::UnboundedReceiver<String>>,
    /// Every log line read so far.
    seen: String,
}

/// The flags [`ServerProcess::spawn`] expects: loopback, port 0, JSON logs. For a command that
/// runs the binary through a wrapper (`sh -c 'ulimit ...'`, `setpriv`), after the binary.
pub const SERVE_ON_LOOPBACK: [&str; 6] =
    ["--host", "127.0.0.1", "--port", "0", "--log-format", "json"];

impl ServerProcess {
    /// The binary's command line: loopback, port 0, JSON logs. Callers add flags and environment,
    /// then [`ServerProcess::spawn`] it.
    pub fn command(bin: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(bin);
        command.args(SERVE_ON_LOOPBACK);
        command
    }

    /// Starts `bin` with these extra flags and environment; see [`ServerProcess::spawn`].
    pub async fn start(
        bin: impl AsRef<OsStr>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<ServerProcess> {
        let mut command = ServerProcess::command(bin);
        command.args(args).envs(envs.iter().copied());
        ServerProcess::spawn(command).await
    }

    /// Starts a command from [`ServerProcess::command`] and waits until it logs where it
    /// listens. Its log is read all along, so it never blocks on a full pipe, and kept for
    /// [`ServerProcess::wait_log`] and [`ServerProcess::exit`].
    pub async fn spawn(mut command: Command) -> anyhow::Result<ServerProcess> {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {:?}", command.as_std().get_program()))?;
        let pid = child.id().context("no pid right after the start")?;
        let (tx, logs) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().context("stderr is piped")?).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut server = ServerProcess {
            child,
            pid,
            addr: String::new(),
            logs: Some(logs),
            seen: String::new(),
        };
        let listening = server.wait_log("listening").await?;
        server.addr = listening["fields"]["addr"]
            .as_str()
            .context("a listening line without addr")?
            .to_owned();
        Ok(server)
    }

    /// `http://` and the address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the server with tonic's default settings.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let channel = Channel::from_shared(self.url())?
            .connect()
            .await
            .context("connect to the binary")?;
        Ok(channel)
    }

    /// Stops keeping the log (a long benchmark would pile it up) and echoes its warnings and
    /// errors to stderr instead.
    pub fn echo_warnings(&mut self) {
        let Some(mut logs) = self.logs.take() else {
            return;
        };
        tokio::spawn(async move {
            while let Some(line) = logs.recv().await {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("  server: {}", line.chars().take(300).collect::<String>());
                }
            }
        });
    }

    /// Reads log lines until one has this message (each line awaited at most 60 s). Every line
    /// must be JSON.
    pub async fn wait_log(&mut self, message: &str) -> anyhow::Result<serde_json::Value> {
        let logs = self.logs.as_mut().context("the log is echoed, not kept")?;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), logs.recv())
                .await
                .with_context(|| format!("no {message:?} log"))?
                .with_context(|| format!("exited before logging {message:?}:\n{}", self.seen))?;
            self.seen.push_str(&line);
            self.seen.push('\n');
            let entry: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("not a JSON log line: {line}"))?;
            if entry["fields"]["message"] == message {
                return Ok(entry);
            }
        }
    }

    /// Sends SIGTERM, as an orchestrator does to stop it.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the binary already exited")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits (at most 60 s) for the process to exit, then returns its status and its whole log.
    pub async fn exit(&mut self) -> anyhow::Result<(ExitStatus, String)> {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("the binary did not exit in time")??;
        // The reader task may still be catching up: read to the end of the log.
        if let Some(logs) = self.logs.as_mut() {
            while let Ok(Some(line)) =
                tokio::time::timeout(Duration::from_secs(10), logs.recv()).await
            {
                self.seen.push_str(&line);
                self.seen.push('\n');
            }
        }
        Ok((status, self.seen.clone()))
    }

    /// SIGTERM, then up to 30 s to exit before SIGKILL.
    pub async fn stop(mut self) {
        let _ = self.sigterm();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
