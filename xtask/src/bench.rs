//! `cargo xtask bench`: to be written.

use std::process::ExitCode;

/// Entry point of `cargo xtask bench`.
pub fn main(_args: &[String]) -> ExitCode {
    eprintln!("xtask bench: not written yet");
    ExitCode::FAILURE
}
