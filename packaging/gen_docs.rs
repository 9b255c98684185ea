//! Writes the man pages and shell completions that the Debian package ships, from the command line
//! itself (`mastsub::cli::Cli`), so that they never drift from it:
//!
//! ```sh
//! cargo run --locked --example gen_docs -- target/packaging
//! ```
//!
//! Into the folder given: `mastsub.1` and one page per subcommand (`mastsub-run.1`, ...), and the
//! completions for bash (`mastsub.bash`), zsh (`_mastsub`) and fish (`mastsub.fish`).
//! `packaging/build-deb.sh` runs it before `cargo deb`; the files are listed as assets in Cargo.toml.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};
use mastsub::cli::Cli;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example gen_docs -- OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&dir)) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen_docs: {}: {e}", Path::new(&dir).display());
            ExitCode::FAILURE
        }
    }
}

/// Writes every page and completion file into `dir`; returns their paths.
fn generate(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut files = Vec::new();

    // As clap_mangen::generate_to does (no page for the `help` subcommand), with extra sections on
    // the main page.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        files.push(Man::new(sub.clone()).generate_to(dir)?);
    }
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(main_page_extra().to_roff().as_bytes());
    let main_page = dir.join(man.get_filename());
    fs::write(&main_page, page)?;
    files.push(main_page);

    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        files.push(clap_complete::generate_to(shell, &mut cmd, &name, dir)?);
    }
    Ok(files)
}

/// What the command line cannot tell: exit codes, environment, files (as installed by the package).
fn main_page_extra() -> Roff {
    let mut roff = Roff::new();
    // Neither hyphenated nor justified: these sections are full of long names.
    roff.control("nh", []);
    roff.control("ad", ["l"]);
    let item = |roff: &mut Roff, tag: Vec<clap_mangen::roff::Inline>, text: &str| {
        roff.control("TP", []);
        roff.text(tag);
        roff.text([roman(text)]);
    };

    roff.control("SH", ["EXIT STATUS"]);
    item(&mut roff, vec![bold("0")], "Success.");
    item(
        &mut roff,
        vec![bold("1")],
        "ingest: a notice was refused, whole or in part, or a file could not be read. download: \
         not every product selected is COMPLETE, or a notice was refused.",
    );
    item(
        &mut roff,
        vec![bold("2")],
        "The configuration or the command line is wrong, or the work could not be done (the \
         database is unavailable, or another daemon already runs on it).",
    );

    roff.control("SH", ["ENVIRONMENT"]);
    item(
        &mut roff,
        vec![
            bold("MASTSUB_"),
            italic("SECTION"),
            bold("__"),
            italic("KEY"),
        ],
        "Overrides one configuration key, e.g. MASTSUB_DOWNLOAD__WORKERS=8; list keys take commas.",
    );
    item(
        &mut roff,
        vec![bold("MAST_API_TOKEN")],
        "A MAST API token for exclusive-access data (or mast.token_file in the configuration).",
    );
    item(
        &mut roff,
        vec![bold("RUST_LOG")],
        "A log filter (error, warn, info, debug, trace, or per module); it wins over log.level.",
    );

    roff.control("SH", ["FILES"]);
    item(
        &mut roff,
        vec![italic("/etc/mastsub/mastsub.toml")],
        "The configuration, read when --config is not given and the file exists (else the built-in \
         defaults). It lists every key with its default. mastsub check-config prints the effective \
         configuration.",
    );
    item(
        &mut roff,
        vec![italic("/var/lib/mastsub")],
        "The working directory of mastsub.service, which runs as user mastsub: the relative paths \
         of the configuration (by default inbox/, mastsub.db and mastDownload/) land there.",
    );
    item(
        &mut roff,
        vec![italic("/usr/share/doc/mastsub/README.md")],
        "The full documentation.",
    );

    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1): "),
        roman("sudo systemctl enable --now mastsub, journalctl -u mastsub."),
    ]);
    roff
}
