//! The `election-agent` binary: runs the agent (default), prints the OpenAPI document, acts as
//! a gRPC client, or benchmarks an agent.

use std::{path::PathBuf, process::ExitCode};

use clap::{Arg, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use election_agent::{
    bench::{self, BenchArgs},
    client::{self, ClientArgs},
    config::{Config, ConfigError, Environment, SETTINGS, Sources},
    http, server,
};

#[derive(Parser)]
#[command(
    name = "election-agent",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (what happens without a subcommand).
    Serve(ServeArgs),
    /// Print the OpenAPI 3 document of the REST API.
    Openapi,
    /// Print the `Election` CustomResourceDefinition (YAML, as crds/election.yaml holds it).
    Crd,
    /// Call an agent's gRPC API.
    Client(ClientArgs),
    /// Measure an agent: requests/s, latency and errors under load.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// YAML configuration file (settings by their dotted path, e.g. `grpc: {port: 50051}`).
    #[arg(long, env = "EA_CONFIG_FILE", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingFlags,
}

/// One `--flag VALUE` per configuration setting, generated from `config::SETTINGS`.
struct SettingFlags(Vec<(&'static str, String)>);

impl FromArgMatches for SettingFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(
            SETTINGS
                .iter()
                .filter_map(|s| Some((s.key, matches.get_one::<String>(s.key)?.clone())))
                .collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        SETTINGS.iter().fold(cmd, |cmd, s| {
            cmd.arg(
                Arg::new(s.key)
                    .long(s.flag())
                    .value_name("VALUE")
                    .help(format!(
                        "{} [env: {}] [default: {:?}]",
                        s.help, s.key, s.default
                    )),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Openapi) => match http::openapi().to_pretty_json() {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Some(Command::Crd) => {
            print!("{}", election_agent::operator::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Some(Command::Client(args)) => {
            init_tool_logging();
            match client::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(&err),
            }
        }
        Some(Command::Bench(args)) => {
            init_tool_logging();
            match bench::run(args).await {
                Ok(true) => ExitCode::SUCCESS,
                // A soak that failed its checks: its report says which.
                Ok(false) => ExitCode::FAILURE,
                Err(err) => fail(&err),
            }
        }
        Some(Command::Serve(args)) => serve(args).await,
        None => serve(cli.serve).await,
    }
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("election-agent: {err}");
    ExitCode::FAILURE
}

fn configuration(args: &ServeArgs) -> Result<(Config, Sources), ConfigError> {
    let mut sources = Sources::default().environment(std::env::vars());
    if let Some(path) = &args.config {
        sources = sources.read_file(path)?;
    }
    for (key, value) in &args.settings.0 {
        sources = sources.flag(key, value.clone());
    }
    Ok((sources.resolve()?, sources))
}

async fn serve(args: ServeArgs) -> ExitCode {
    let signal = shutdown_signal();
    let (config, sources) = match configuration(&args) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("election-agent: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    for key in sources.unknown_environment_keys() {
        tracing::warn!(
            key,
            "ignoring an EA_* variable that this agent does not use"
        );
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        name = %config.name,
        store = config.store.mode.as_str(),
        "starting election-agent"
    );
    let agent = match server::start(&config).await {
        Ok(agent) => agent,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            return fail(&err);
        }
    };
    let stop = async {
        let signal = signal.await;
        tracing::info!(signal, "shutting down: draining requests in flight");
    };
    match agent.run_until(stop).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "stopped abnormally");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, refines EA_LOG_LEVEL per module. The Redis client's own logs are off
    // by default: it logs every failed reconnection attempt at ERROR (about one a second per
    // server while one is down), and the agent reports the same outage once, as a warning, with
    // the store's readiness and metrics; `RUST_LOG=info,rustis=warn` shows them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rustis=off", config.log_level.as_str())));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.environment {
        Environment::Production => builder.json().with_current_span(false).init(),
        Environment::Development => builder.compact().init(),
    }
}

/// Logging of the commands that are not the agent (`client`, `bench`): warnings and errors on
/// standard error, refined by RUST_LOG. Without a subscriber, tracing would also hand every span
/// of h2 and hyper to the `log` crate's level check, a sixth of the load generator's instructions
/// (and of the in-process agent's, in `bench pods`).
fn init_tool_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,rustis=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
}

/// Resolves with the signal's name on SIGTERM or SIGINT. The handlers are registered when this is
/// called, not when the future is first polled, so a signal during start-up is not lost (and does
/// not kill the process with the default action).
fn shutdown_signal() -> impl Future<Output = &'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                },
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                    "SIGINT"
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
