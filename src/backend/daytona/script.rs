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

/// The line to run in the session for `spec`.
pub fn command_line(spec: &JobSpec) -> String {
    let mut words: Vec<String> = Vec::new();
    if let Some(cwd) = &spec.cwd {
        words.extend(["cd".into(), "--".into(), quote(cwd), "&&".into()]);
    }
    // `env -` is not used: the sandbox's own environment (PATH, HOME) stays.
    // `--`: a variable name starting with '-' must not be read as an option of `env`.
    words.extend(["env".into(), "--".into()]);
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
    words.join(" ")
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
}
