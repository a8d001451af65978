//! `gateway`: parse the command line, run the command.

use clap::Parser;
use gateway_bin::cli::{Cli, run};
use std::process::ExitCode;

fn main() -> ExitCode {
    run(Cli::parse())
}
