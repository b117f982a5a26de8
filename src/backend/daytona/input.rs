//! A Daytona job's stdin: its session command's `POST …/input`.
//!
//! Daytona's input API takes text (a JSON string), appends a newline to every write that lacks
//! one, and has no end of input. So only whole lines of UTF-8 reach the program as written:
//! each write must end with a newline and be UTF-8, else it is refused (INVALID_ARGUMENT) with
//! nothing sent and stdin still open. Sending a partial line would add a newline the client
//! never wrote, and holding it back until the rest arrives would buffer without bound. Each
//! accepted write is one `/input` call; nothing is buffered here. CloseInput is refused
//! ([`InputSink::has_eof`]). A write cancelled mid-call may still reach the command: its one
//! HTTP request cannot be recalled.

use std::{io, sync::Arc};

use async_trait::async_trait;

use super::{ApiError, DaytonaClient, Toolbox};
use crate::job::{InputRefused, InputSink};

/// The stdin of one session command.
pub(super) struct CommandInput {
    client: Arc<DaytonaClient>,
    toolbox: Toolbox,
    session_id: String,
    command_id: String,
}

impl CommandInput {
    pub fn new(
        client: Arc<DaytonaClient>,
        toolbox: Toolbox,
        session_id: String,
        command_id: String,
    ) -> Self {
        CommandInput {
            client,
            toolbox,
            session_id,
            command_id,
        }
    }
}

/// The text of a write Daytona can deliver as written, or why not.
fn whole_lines(data: &[u8]) -> Result<&str, InputRefused> {
    if data.last() != Some(&b'\n') {
        return Err(InputRefused::Unfaithful(
            "the daytona backend sends stdin in whole lines: end each write with a newline \
             (Daytona's input API adds one to every write, so a partial line cannot be sent)"
                .into(),
        ));
    }
    std::str::from_utf8(data).map_err(|_| {
        InputRefused::Unfaithful(
            "the daytona backend's stdin takes UTF-8 text only (Daytona's input API carries a \
             JSON string)"
                .into(),
        )
    })
}

#[async_trait]
impl InputSink for CommandInput {
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let text = whole_lines(data)?;
        let sent = self
            .client
            .send_input(&self.toolbox, &self.session_id, &self.command_id, text)
            .await;
        match sent {
            Ok(()) => Ok(data.len()),
            // 410: the command has completed; 404: its session is gone. Like a closed pipe.
            Err(e @ (ApiError::Gone(_) | ApiError::NotFound(_))) => {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
            }
            Err(e) => Err(InputRefused::Unconfirmed(format!(
                "Daytona did not confirm the write ({e}); it may or may not have reached the \
                 command, whose stdin stays open"
            ))
            .into()),
        }
    }

    /// Daytona's input has no end: closing is refused, and the command's stdin stays open.
    fn has_eof(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_of_text_are_sent() {
        assert_eq!(whole_lines(b"a\nb\n"), Ok("a\nb\n"));
        assert!(matches!(
            whole_lines(b"no newline"),
            Err(InputRefused::Unfaithful(m)) if m.contains("whole lines")
        ));
        assert!(matches!(
            whole_lines(b"\xff\n"),
            Err(InputRefused::Unfaithful(m)) if m.contains("UTF-8")
        ));
    }
}
