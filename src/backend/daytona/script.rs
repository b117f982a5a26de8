//! Builds the shell line sent to a Daytona session for a job.
//!
//! The session shell *sources* what it is given, so `exit`, `set -e` or `exec` in a command
//! would kill the session shell itself (and Daytona then never records an exit code). The job
//! therefore always runs in a child process: `env` with the job's variables, then either
//! `/bin/sh -c <command>` (same meaning as the local backend) or the exact argv (via `exec "$@"`).

use crate::job::{JobSpec, Program};

/// Quotes `s` for a POSIX shell: single quotes, with each `'` written as `'\''`. Everything
/// else, newlines and `$` included, is literal inside single quotes.
pub fn quote(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('\'');
    for c in s.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// The line to run in the session for `spec`. A job without `stdin` reads /dev/null: Daytona
/// keeps every async command's stdin open for `/input`, so a program reading it would otherwise
/// wait forever.
pub fn command_line(spec: &JobSpec) -> String {
    let mut words = cd_words(spec);
    words.extend(job_words(spec));
    if !spec.stdin {
        words.push("</dev/null".into());
    }
    words.join(" ")
}

/// The line typed into a terminal session's shell for a `tty` job (`banner_parts` joined is
/// the banner; see the PTY module). It prints the banner, so the reader knows where the job's
/// own output starts (the shell's greeting, prompt and echo of this line come before it, and
/// the echo holds the banner only split), then replaces the shell with the job, so the
/// terminal session ends with the job's exit status. If `cd` fails the shell exits with its
/// status instead of waiting at a prompt. The leading space keeps the line out of history.
pub fn terminal_line(spec: &JobSpec, banner_parts: (&str, &str)) -> String {
    let mut words: Vec<String> = vec![
        " printf".into(),
        quote("%s%s\\n"),
        quote(banner_parts.0),
        quote(banner_parts.1),
        ";".into(),
    ];
    words.extend(cd_words(spec));
    words.push("exec".into());
    words.extend(job_words(spec));
    words.extend([";".into(), "exit".into()]);
    words.join(" ")
}

fn cd_words(spec: &JobSpec) -> Vec<String> {
    match &spec.cwd {
        Some(cwd) => vec!["cd".into(), "--".into(), quote(cwd), "&&".into()],
        None => Vec::new(),
    }
}

/// `env` with the job's variables, then its program.
fn job_words(spec: &JobSpec) -> Vec<String> {
    // `env -` is not used: the sandbox's own environment (PATH, HOME) stays.
    // `--`: a variable name starting with '-' must not be read as an option of `env`.
    let mut words: Vec<String> = vec!["env".into(), "--".into()];
    for (name, value) in &spec.env {
        words.push(quote(&format!("{name}={value}")));
    }
    match &spec.program {
        Program::Shell(line) => {
            words.extend(["/bin/sh".into(), "-c".into(), quote(line)]);
        }
        Program::Argv(argv) => {
            // Through `"$@"` rather than directly after `env`: a program name containing '='
            // would otherwise be read by `env` as one more assignment.
            words.extend([
                "/bin/sh".into(),
                "-c".into(),
                quote("exec \"$@\""),
                "sh".into(),
            ]);
            words.extend(argv.iter().map(|a| quote(a)));
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(line: &str) -> String {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(line)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn quoting_round_trips_hostile_strings() {
        for s in [
            "plain",
            "a b",
            "it's",
            "'",
            "$HOME `id` $(id)",
            "new\nline",
            "\\",
            "\"q\"",
            "",
        ] {
            assert_eq!(sh(&format!("printf '%s' {}", quote(s))), s);
        }
    }

    #[test]
    fn env_cwd_and_argv_cannot_inject_commands() {
        let mut spec = JobSpec {
            cwd: Some("/".into()),
            ..JobSpec::new(Program::Argv(vec![
                "printf".into(),
                "%s|%s".into(),
                "$(echo pwned)".into(),
                "; echo x".into(),
            ]))
        };
        spec.env
            .insert("V".into(), "it's $(echo pwned)\n; echo injected".into());
        assert_eq!(sh(&command_line(&spec)), "$(echo pwned)|; echo x");
        spec.program = Program::Shell("printf '%s' \"$V\"; pwd".into());
        assert_eq!(
            sh(&command_line(&spec)),
            "it's $(echo pwned)\n; echo injected/\n"
        );
    }

    #[test]
    fn a_job_without_stdin_reads_dev_null_and_a_terminal_line_prints_the_banner_then_runs_it() {
        let mut spec = JobSpec::new(Program::Shell("cat; echo done".into()));
        assert_eq!(sh(&command_line(&spec)), "done\n");
        spec.cwd = Some("/".into());
        spec.program = Program::Shell("pwd; exit 3".into());
        let line = terminal_line(&spec, ("BAN", "NER"));
        assert!(
            !line.contains("BANNER"),
            "the echo must not hold the banner: {line}"
        );
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"BANNER\n/\n");
        spec.cwd = Some("/no/such/dir".into());
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(terminal_line(&spec, ("BAN", "NER")))
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "a failed cd ends the shell");
    }
}
