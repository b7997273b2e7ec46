//! `steerlm-convert serve`: load the model once, then `steerlm_convert::serve::run`.

use std::process::ExitCode;

use steerlm_convert::runtime::load::Model;
use steerlm_convert::serve;
use steerlm_convert::Error;

use crate::cli::ServeArgs;

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if args.queue == 0 {
        return Err(Error::Usage("--queue must be at least 1".into()).into());
    }
    let device = super::runtime_device(args.device, args.io.quiet)?;
    let mut model = Model::open(&args.model, &super::read_options(&args.io, &args.crc))?;
    model.select_device(device, !args.io.quiet)?;
    let name = args
        .model
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let cfg = serve::Config {
        host: args.host.clone(),
        port: args.port,
        queue: args.queue,
        max_body: args.max_body.min(usize::MAX as u64) as usize,
        threads: args.threads.unwrap_or(0),
    };
    serve::run(model, name.clone(), &cfg, |addr| {
        eprintln!("serving {name} on http://{addr} (PUT /generate, /v1/completions, /v1/chat/completions, /v1/models, /health)");
    })?;
    Ok(ExitCode::SUCCESS)
}
