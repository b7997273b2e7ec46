use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;

fn main() -> ExitCode {
    // A file-size limit (ulimit -f) must be a write error we clean up after, not a kill.
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Inspect(args) => commands::inspect::run(&args),
        cli::Command::NemoToSafetensors(args) => commands::nemo_to_safetensors::run(&args),
        cli::Command::Reshard(args) => commands::reshard::run(&args),
        cli::Command::Generate(args) => commands::generate::run(&args),
        cli::Command::Quantize(args) => commands::quantize::run(&args),
        cli::Command::Verify(args) => commands::verify::run(&args),
        cli::Command::Serve(args) => commands::serve::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            if let Some(steerlm_convert::Error::Interrupted) =
                e.downcast_ref::<steerlm_convert::Error>()
            {
                eprintln!("steerlm-convert: interrupted; partial output removed");
                return ExitCode::from(130);
            }
            eprintln!("steerlm-convert: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause said once: a cause whose text the
/// message already holds (an I/O error wrapped with its path) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg.replace('\n', " ")
}
