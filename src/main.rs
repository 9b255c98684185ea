//! The `mastsub` binary: parses the command line and hands it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    mastsub::cli::main(mastsub::cli::Cli::parse())
}
