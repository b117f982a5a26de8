//! A `tty` job's screen, modelled from its output as a terminal would draw it (the vt100
//! crate, as tmux and screen keep one per pane), so that a client that missed output gets the
//! screen itself, not bytes cut in the middle of an escape sequence.
//!
//! The model's memory (two grids of 32-byte cells: the main screen and, once a full-screen
//! program asks for it, the alternate one) is held in the server's output budget while the job
//! runs, so terminals count in the same bound as buffered output. It is given back when the job
//! ends ([`Screen::close`]): thousands of finished jobs are remembered, and their screens would
//! take the budget from running jobs. A late reader of a finished job gets its log's tail.

use std::{num::NonZeroU16, sync::Mutex};

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::{OutputBudget, TerminalSize};

/// Most cells (rows x columns) a job's terminal may have: 2 MiB per grid.
pub const MAX_TERMINAL_CELLS: u32 = 65_536;

/// Bytes of the output budget a screen of `size` holds: both grids, 32 bytes a cell.
fn screen_bytes(size: TerminalSize) -> usize {
    2 * 32 * usize::from(size.rows) * usize::from(size.cols)
}

/// Why a screen could not be made or resized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server's output budget has no room for a {rows}x{cols} terminal's screen ({bytes} bytes)"
)]
pub struct NoRoomForScreen {
    pub rows: u16,
    pub cols: u16,
    pub bytes: usize,
}

/// The screen as a terminal shows it after the event `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenSnapshot {
    /// The last event whose output the screen includes.
    pub seq: u64,
    /// Escape sequences and text that draw it.
    pub screen: Bytes,
    pub size: TerminalSize,
    /// Row and column of the cursor, from 0.
    pub cursor: (u16, u16),
    /// Output bytes drawn (the offset of the next output).
    pub stdout_offset: u64,
    pub alternate_screen: bool,
}

/// A job's screen, until it is closed.
pub struct Screen {
    state: Mutex<Option<State>>,
    /// Its size, kept once closed (for Status).
    size: Mutex<TerminalSize>,
    budget: OutputBudget,
}

struct State {
    parser: vt100::Parser,
    size: TerminalSize,
    /// The last event drawn (0, `Started`, before any output).
    seq: u64,
    stdout_offset: u64,
    /// The screen's memory in the output budget.
    held: OwnedSemaphorePermit,
}

impl Screen {
    /// A blank screen of `size` (within [`MAX_TERMINAL_CELLS`]), its memory taken from
    /// `budget` without waiting.
    pub fn new(size: TerminalSize, budget: &OutputBudget) -> Result<Screen, NoRoomForScreen> {
        let held = hold(budget, size, screen_bytes(size))?;
        Ok(Screen {
            state: Mutex::new(Some(State {
                parser: vt100::Parser::new(nonzero(size.rows), nonzero(size.cols), 0),
                size,
                seq: 0,
                stdout_offset: 0,
                held,
            })),
            size: Mutex::new(size),
            budget: budget.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draws the output of event `seq` (nothing once closed).
    pub fn draw(&self, seq: u64, data: &[u8]) {
        if let Some(state) = self.lock().as_mut() {
            state.parser.process(data);
            state.seq = seq;
            state.stdout_offset += data.len() as u64;
        }
    }

    /// The job has ended: the model and its memory go.
    pub fn close(&self) {
        drop(self.lock().take());
    }

    /// The terminal was resized: so is the screen (its memory grows within the budget, or the
    /// resize is refused). Nothing to do once closed.
    pub fn resize(&self, size: TerminalSize) -> Result<(), NoRoomForScreen> {
        let mut guard = self.lock();
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        let (had, needs) = (screen_bytes(state.size), screen_bytes(size));
        if needs > had {
            let more = hold(&self.budget, size, needs - had)?;
            state.held.merge(more);
        } else if needs < had {
            drop(state.held.split(had - needs));
        }
        state
            .parser
            .set_size(nonzero(size.rows), nonzero(size.cols));
        state.size = size;
        *self.size.lock().unwrap_or_else(|e| e.into_inner()) = size;
        Ok(())
    }

    /// The last event drawn; `None` once closed.
    pub fn drawn_seq(&self) -> Option<u64> {
        self.lock().as_ref().map(|state| state.seq)
    }

    /// Its size now (its last size, once closed).
    pub fn size(&self) -> TerminalSize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The screen as it is now; `None` once closed.
    pub fn snapshot(&self) -> Option<ScreenSnapshot> {
        let guard = self.lock();
        let state = guard.as_ref()?;
        let screen = state.parser.screen();
        let mut drawn = Vec::new();
        if screen.alternate_screen() {
            // So that the client's terminal, like the program's, goes back to its main screen
            // when the program leaves the alternate one.
            drawn.extend_from_slice(b"\x1b[?1049h");
        }
        drawn.extend_from_slice(screen.state_formatted().as_bytes());
        Some(ScreenSnapshot {
            seq: state.seq,
            screen: Bytes::from(drawn),
            size: state.size,
            cursor: screen.cursor_position(),
            stdout_offset: state.stdout_offset,
            alternate_screen: screen.alternate_screen(),
        })
    }
}

fn hold(
    budget: &OutputBudget,
    size: TerminalSize,
    bytes: usize,
) -> Result<OwnedSemaphorePermit, NoRoomForScreen> {
    budget.try_hold_shared(bytes).ok_or(NoRoomForScreen {
        rows: size.rows,
        cols: size.cols,
        bytes,
    })
}

fn nonzero(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap_or(NonZeroU16::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(rows: u16, cols: u16) -> TerminalSize {
        TerminalSize { rows, cols }
    }

    #[test]
    fn a_snapshot_redraws_the_screen_with_its_cursor_and_attributes() {
        let budget = OutputBudget::new(1 << 20, 4096);
        let screen = Screen::new(size(5, 20), &budget).unwrap();
        screen.draw(1, b"\x1b[2J\x1b[H\x1b[1;31mred\x1b[0m plain");
        screen.draw(2, b"\x1b[3;5Hthird");
        let snapshot = screen.snapshot().unwrap();
        assert_eq!(snapshot.seq, 2);
        assert_eq!(snapshot.cursor, (2, 9));
        assert_eq!(snapshot.stdout_offset, 38);
        assert!(!snapshot.alternate_screen);

        // A terminal that prints the snapshot shows the same screen.
        let mut replica = vt100::Parser::new(nonzero(5), nonzero(20), 0);
        replica.process(b"leftover text on the client's screen");
        replica.process(&snapshot.screen);
        let (shown, original) = (replica.screen(), screen.lock());
        let original = original.as_ref().unwrap().parser.screen();
        assert_eq!(shown.contents(), original.contents());
        assert_eq!(shown.cursor_position(), original.cursor_position());
        assert!(shown.cell(0, 0).unwrap().bold());
        assert_eq!(shown.cell(0, 0).unwrap().fgcolor(), vt100::Color::Idx(1));
        assert!(!shown.cell(0, 4).unwrap().bold());
    }

    #[test]
    fn the_alternate_screen_is_entered_on_the_client_too() {
        let budget = OutputBudget::new(1 << 20, 4096);
        let screen = Screen::new(size(4, 10), &budget).unwrap();
        screen.draw(1, b"main\x1b[?1049h\x1b[Hfull");
        let snapshot = screen.snapshot().unwrap();
        assert!(snapshot.alternate_screen);
        assert!(snapshot.screen.starts_with(b"\x1b[?1049h"));
        let mut replica = vt100::Parser::new(nonzero(4), nonzero(10), 0);
        replica.process(&snapshot.screen);
        assert!(replica.screen().alternate_screen());
        assert_eq!(replica.screen().contents(), "full");
    }

    #[test]
    fn screens_hold_their_memory_in_the_output_budget() {
        let budget = OutputBudget::new(100_000, 4096);
        // 24 x 80 x 64 bytes = 122,880: more than the pool.
        assert_eq!(
            Screen::new(size(24, 80), &budget).err(),
            Some(NoRoomForScreen {
                rows: 24,
                cols: 80,
                bytes: 122_880
            })
        );
        let screen = Screen::new(size(10, 80), &budget).unwrap();
        assert_eq!(budget.shared_in_use(), 51_200);
        assert!(screen.resize(size(30, 80)).is_err(), "no room to grow");
        assert_eq!(screen.size(), size(10, 80));
        screen.resize(size(5, 80)).unwrap();
        assert_eq!(budget.shared_in_use(), 25_600);
        screen.resize(size(15, 80)).unwrap();
        assert_eq!(budget.shared_in_use(), 76_800);
        // The job ends: the model goes, its size stays known.
        screen.close();
        assert_eq!(budget.shared_in_use(), 0);
        assert_eq!(screen.snapshot(), None);
        assert_eq!(screen.size(), size(15, 80));
    }
}
