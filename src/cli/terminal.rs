//! The local terminal of `exec -t`: raw mode while the remote job owns the screen (every key,
//! Ctrl-C included, goes to the job), restored on every way out: the guard's drop, and a panic
//! hook for a panic that unwinds past it.

use std::{
    io::IsTerminal,
    sync::{Mutex, Once},
};

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};

/// The settings to restore, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The local terminal in raw mode until dropped.
pub(super) struct RawMode(());

impl RawMode {
    /// Raw mode on stdin, when stdin is a terminal (`None` otherwise: nothing to change).
    pub fn enable() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        install_panic_hook();
        tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        Some(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    if let Some(saved) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &saved);
    }
}

fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// The local terminal's size (rows, columns), from stdout or stdin, when either is one.
pub(super) fn size() -> Option<(u16, u16)> {
    [
        tcgetwinsize(std::io::stdout()),
        tcgetwinsize(std::io::stdin()),
    ]
    .into_iter()
    .flatten()
    .find(|size| size.ws_row > 0 && size.ws_col > 0)
    .map(|size| (size.ws_row, size.ws_col))
}
