//! A `tty` job's terminal, from the server's side: its master, shared by the job's output
//! reader, its input, resizes and signals.
//!
//! - Output: everything the job writes to the terminal, one stream. Linux answers a read of the
//!   master with EIO once every process has closed the terminal and the bytes they wrote are
//!   read: that is the end of the output, not an error.
//! - Input: bytes go through the terminal's line discipline, as typed: echoed, edited, and
//!   Ctrl-C (0x03) becomes SIGINT for the foreground process group. End of input is the
//!   terminal's end-of-file character (VEOF, Ctrl-D), which ends input at the start of a line.
//! - Signals go to the terminal's foreground process group, as a terminal's keys would.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use async_trait::async_trait;
use rustix::termios::{SpecialCodeIndex, Winsize};
use tokio::io::{Interest, unix::AsyncFd};

use crate::job::{InputSink, JobTerminal, TerminalSize};

/// Used when the terminal's own end-of-file character cannot be read.
const CTRL_D: u8 = 0x04;

/// The master side of a job's terminal (non-blocking, registered with the runtime).
pub(super) struct Terminal {
    master: AsyncFd<OwnedFd>,
}

impl Terminal {
    pub fn new(master: OwnedFd) -> io::Result<Arc<Terminal>> {
        let flags = rustix::fs::fcntl_getfl(&master)?;
        rustix::fs::fcntl_setfl(&master, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Arc::new(Terminal {
            master: super::spawn::register(master, Interest::READABLE | Interest::WRITABLE)?,
        }))
    }

    /// Waits until a read may find output (or the end).
    pub async fn readable(&self) -> io::Result<()> {
        self.master.readable().await.map(drop)
    }

    /// Reads what the job wrote into the spare room of `buf`, without waiting: `Ok(0)` at the
    /// end, `WouldBlock` when there is nothing yet.
    pub fn try_read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.master.try_io(Interest::READABLE, |master| {
            match rustix::io::read(master, rustix::buffer::spare_capacity(buf)) {
                // Every process closed the terminal and all they wrote has been read.
                Err(rustix::io::Errno::IO) => Ok(0),
                other => other.map_err(io::Error::from),
            }
        })
    }

    async fn write(&self, data: &[u8]) -> io::Result<usize> {
        self.master
            .async_io(Interest::WRITABLE, |master| {
                rustix::io::write(master, data).map_err(io::Error::from)
            })
            .await
    }

    /// The process group the terminal's input and signals go to now (the shell's foreground
    /// job); `None` when it has none.
    pub fn foreground_group(&self) -> Option<u32> {
        rustix::termios::tcgetpgrp(self.master.get_ref())
            .ok()
            .map(|pid| pid.as_raw_nonzero().get() as u32)
    }

    fn end_of_file(&self) -> u8 {
        rustix::termios::tcgetattr(self.master.get_ref())
            .map(|termios| termios.special_codes[SpecialCodeIndex::VEOF])
            .ok()
            .filter(|&c| c != 0)
            .unwrap_or(CTRL_D)
    }
}

/// A new pseudo-terminal of `size`: its master and its other side, both close-on-exec and
/// neither this process's controlling terminal. The size is set before anyone uses it, so a
/// program started on it draws its first screen at the right size. The other side is opened by
/// the master, not by path: no race with another terminal reusing the name.
pub fn open_pty(size: TerminalSize) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    let terminal = ioctl_tiocgptpeer(&master, flags)?;
    Ok((master, terminal))
}

/// A terminal's size as the kernel takes it.
pub fn winsize(size: TerminalSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// The job's input, typed into its terminal.
pub(super) struct TerminalInput(pub Arc<Terminal>);

#[async_trait]
impl InputSink for TerminalInput {
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data).await
    }

    /// A terminal has no half-close: the end-of-file character is what a program reading it
    /// takes for the end of its input (at the start of a line; after a partial line it only
    /// sends that line).
    async fn close(&mut self) -> io::Result<()> {
        let eof = [self.0.end_of_file()];
        self.0.write(&eof).await.map(drop)
    }
}

/// Resizes the job's terminal.
pub(super) struct TerminalControl(pub Arc<Terminal>);

impl JobTerminal for TerminalControl {
    fn resize(&self, size: TerminalSize) -> io::Result<()> {
        // The kernel sends SIGWINCH to the foreground group when the size changes.
        rustix::termios::tcsetwinsize(self.0.master.as_fd(), winsize(size)).map_err(Into::into)
    }
}
