//! The one thread jobs are spawned from.
//!
//! A spawn blocks its thread until the child has exec'd (vfork), and spawns take turns (the
//! leaders' lock). On the runtime's workers a burst of Execs kept one of the two workers
//! spawning while every call, Health included, queued on the other (Health 168 ms at the start
//! of 10,000 streams). On tokio's blocking pool it is worse: a job's parent-death signal fires
//! when the *thread* that spawned it exits, and idle pool threads exit (3,998 of 4,992 jobs were
//! SIGKILLed so). So every spawn runs on one thread of its own that lives as long as the
//! process: the workers only wait for its answer, and no job's parent-death signal fires while
//! the server lives.

use std::{io, panic::AssertUnwindSafe, sync::OnceLock};

use tokio::sync::{mpsc, oneshot};

type Task = Box<dyn FnOnce() + Send>;

/// Spawns waiting for the thread. Small on purpose: a caller prepares its job (environment,
/// cgroup, C strings) only once it holds a place here (see [`Turn`]), so a burst of Execs is
/// prepared at the pace the thread spawns (about a thousand a second), a few milliseconds
/// ahead of it, instead of all at once on the runtime's workers, where that work queued ahead
/// of every other call, Health included.
const QUEUE: usize = 16;

fn queue() -> &'static mpsc::Sender<Task> {
    static SPAWNER: OnceLock<mpsc::Sender<Task>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, mut rx) = mpsc::channel::<Task>(QUEUE);
        // Never joined, never ends: the sender is the process's (see the module docs).
        std::thread::Builder::new()
            .name("job-spawner".into())
            .spawn(move || {
                while let Some(task) = rx.blocking_recv() {
                    // A panic is the caller's error (its answer is dropped), not the thread's end.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(task));
                }
            })
            .expect("start the job-spawner thread");
        tx
    })
}

/// A place in the spawner thread's queue. Callers wait for one in the order they asked (without
/// blocking), prepare their job, then [`spawn`](Turn::spawn) it; dropping the turn gives the
/// place back.
pub(super) struct Turn(mpsc::OwnedPermit<Task>);

impl Turn {
    /// Waits for a place in the queue.
    pub async fn wait() -> io::Result<Turn> {
        let permit = queue().clone().reserve_owned().await.map_err(|_| gone())?;
        Ok(Turn(permit))
    }

    /// Runs `spawn` on the spawner thread and returns what it made. When the caller has gone
    /// by the time its turn comes, `spawn` does not run; when it goes while `spawn` runs, what
    /// was made is handed to `orphaned` (which must stop it), on the spawner thread.
    pub async fn spawn<T: Send + 'static>(
        self,
        spawn: impl FnOnce() -> io::Result<T> + Send + 'static,
        orphaned: impl FnOnce(T) + Send + 'static,
    ) -> io::Result<T> {
        let (answer, answered) = oneshot::channel();
        self.0.send(Box::new(move || {
            if answer.is_closed() {
                return;
            }
            if let Err(Ok(made)) = answer.send(spawn()) {
                orphaned(made);
            }
        }));
        answered.await.map_err(|_| gone())?
    }
}

fn gone() -> io::Error {
    io::Error::other("the job-spawner thread is gone")
}

/// [`Turn::wait`], then [`Turn::spawn`]: for a job with nothing to prepare.
#[cfg(test)]
async fn on_spawner_thread<T: Send + 'static>(
    spawn: impl FnOnce() -> io::Result<T> + Send + 'static,
    orphaned: impl FnOnce(T) + Send + 'static,
) -> io::Result<T> {
    Turn::wait().await?.spawn(spawn, orphaned).await
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn runs_on_one_named_thread_and_answers() {
        let name = on_spawner_thread(
            || Ok(std::thread::current().name().map(str::to_owned)),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some("job-spawner"));
        let error = on_spawner_thread::<()>(|| Err(io::Error::other("no")), |_| {})
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), "no");
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_place_before_it_prepares_anything() {
        // Every place held (other tests of this binary may hold some as well: that only makes
        // the next caller wait longer).
        let mut held = Vec::new();
        for _ in 0..QUEUE {
            held.push(Turn::wait().await.unwrap());
        }
        let next = tokio::spawn(Turn::wait());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "a place beyond the queue's {QUEUE}");
        // A place given back (a caller that left before spawning) goes to the one waiting.
        drop(held.pop());
        let turn = tokio::time::timeout(std::time::Duration::from_secs(30), next)
            .await
            .expect("the freed place")
            .unwrap()
            .unwrap();
        assert_eq!(turn.spawn(|| Ok(1), |_| {}).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_the_thread_goes_on() {
        let panicked = on_spawner_thread::<()>(|| panic!("boom"), |_| {}).await;
        assert!(panicked.is_err());
        assert_eq!(on_spawner_thread(|| Ok(7), |_| {}).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn what_is_made_for_a_caller_that_left_is_handed_to_orphaned() {
        let orphans = Arc::new(AtomicUsize::new(0));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let counted = Arc::clone(&orphans);
        let call = tokio::spawn(on_spawner_thread(
            move || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(1)
            },
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        ));
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        call.abort();
        let _ = call.await;
        go_tx.send(()).unwrap();
        // The thread runs tasks in order: once the next one answers, the orphan was handled.
        on_spawner_thread(|| Ok(()), |_| {}).await.unwrap();
        assert_eq!(orphans.load(Ordering::SeqCst), 1);
    }
}
