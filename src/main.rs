//! The `sandbox-runner` binary: parse configuration, bind, serve until SIGTERM or SIGINT;
//! SIGHUP re-reads the secret files.

use std::{
    cell::Cell,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use sandbox_runner::{Config, config::LoadError, server::run_with_reload, telemetry};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::error;

/// mimalloc rather than glibc's malloc: after a burst of output (thousands of 1 MiB chunks
/// freed from many threads) glibc kept the memory resident in its arenas; mimalloc gives it back
/// to the OS (BENCHMARKS.md, stalled readers).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error (EX_USAGE), as is customary for daemons.
const EXIT_CONFIG: u8 = 64;

/// How often at most a runtime thread that goes idle asks mimalloc to return what it can.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(collect_when_idle)
        .build();
    // `sandbox-runner exec ...` and the other client commands; anything else is the server.
    let client = std::env::args()
        .nth(1)
        .is_some_and(|first| sandbox_runner::cli::SUBCOMMANDS.contains(&first.as_str()));
    match runtime {
        Ok(runtime) if client => {
            let code = runtime.block_on(sandbox_runner::cli::run(std::env::args_os()));
            // Without waiting for a read of stdin that may never complete (`exec -i` on a
            // terminal): the job has ended, and the terminal is restored already.
            runtime.shutdown_background();
            code
        }
        Ok(runtime) => runtime.block_on(serve()),
        Err(e) => {
            eprintln!("sandbox-runner: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Called by a runtime thread about to wait for work. mimalloc frees a block another thread
/// allocated only when the allocating thread next looks at its heap, and returns emptied pages
/// to the OS then too; a worker that allocated a burst of output and then went idle never looks.
/// Measured: 30 s after 256 stalled Exec streams closed, RSS stayed 180-200 MiB above idle in
/// most runs, the output freed but not given back. So an idle thread collects its heap, at most
/// once a second (a non-forced collect is a walk of its own pages).
fn collect_when_idle() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last.get().is_some_and(|at| now - at < COLLECT_EVERY) {
            return;
        }
        last.set(Some(now));
        // SAFETY: mi_collect takes no pointer and may be called from any thread at any time; it
        // only works on the calling thread's heap (and mimalloc's shared bookkeeping, which it
        // locks itself).
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(false);
        }
    });
}

async fn serve() -> ExitCode {
    let mut config = match Config::load_from(std::env::args_os()) {
        Ok(config) => config,
        Err(LoadError::Usage(e)) => e.exit(),
        Err(LoadError::Invalid(e)) => {
            eprintln!("sandbox-runner: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.check_config {
        println!(
            "configuration OK: backend {}, listening on {}, replica {}",
            config.backend.as_str(),
            config.listen_addr(),
            config.replica()
        );
        return ExitCode::SUCCESS;
    }
    let telemetry = telemetry::init(config.log_format);
    // Jobs run as our uid; without this they could read our secrets from /proc/<ppid>/environ
    // (and ptrace us). Non-dumpable processes' /proc entries are root-only.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not make the process non-dumpable");
    }

    raise_fd_limit();
    let reload = reload_on_sighup();
    become_subreaper(&mut config);

    let addr = config.listen_addr();
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            error!(%addr, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let code = match run_with_reload(listener, config, shutdown_signal(), reload).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

/// Every connection and every job's pipes take descriptors: the soft `RLIMIT_NOFILE` (often
/// 1,024) is raised to the hard limit so that the server's own limits, not the kernel's, are
/// what callers meet. Jobs inherit the raised limit.
fn raise_fd_limit() {
    match sandbox_runner::connection::raise_open_file_limit() {
        Ok((soft, hard)) if soft < hard => {
            tracing::info!(from = soft, to = hard, "raised the open-file limit")
        }
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit already at its maximum"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Notifies on every SIGHUP, the conventional "re-read your configuration" signal: the server
/// re-reads its secret files. Installed before the server listens, so a SIGHUP sent once it
/// does never takes SIGHUP's default action (exit).
fn reload_on_sighup() -> Arc<Notify> {
    let reload = Arc::new(Notify::new());
    let mut hangup = signal(SignalKind::hangup()).expect("cannot install a SIGHUP handler");
    let notify = Arc::clone(&reload);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            notify.notify_one();
        }
    });
    reload
}

/// Makes this process the reaper of everything its jobs start: a process that leaves its job
/// and whose parent exits is re-parented here rather than to init, so the server can find it,
/// stop it with its job, and reap it. Only the binary does this: it starts no other children,
/// which the local backend relies on to tell orphans from its own children.
fn become_subreaper(config: &mut Config) {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => config.local.subreaper = true,
        Err(e) => tracing::warn!(
            error = %e,
            "cannot become a child subreaper: processes that leave their job are re-parented to \
             init, out of the server's reach"
        ),
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("cannot install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
