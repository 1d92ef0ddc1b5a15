//! The `apex` binary: parse, wire, call the library, map errors to exit codes.

mod args;
mod commands;
mod exit;
mod html;
mod progress;
mod report;
mod table;

use std::process::ExitCode;

use args::Cli;

/// A command line that parsed but makes no sense (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// glibc gives each thread that allocates an arena of its own and keeps
/// what each arena frees: a long run's many short-lived buffers, spread over
/// the runtime's and the ledger's threads, raised peak RSS from 51 MiB at
/// 10,000 generations to 114 MiB at 50,000 with the heap itself bounded.
/// One arena keeps it near flat (37 / 56 MiB). The allocator reads
/// `MALLOC_ARENA_MAX` only when it starts, so it is set and the binary
/// re-executed once (same process id); a caller's own value is kept, and if
/// the exec fails Apex runs as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only if it failed.
    let _ = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("MALLOC_ARENA_MAX", "1")
        .exec();
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    cap_malloc_arenas();
    let raw: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = raw.iter().map(String::as_str).collect();
    let cli = match <Cli as argh::FromArgs>::from_args(&strs[..1], &strs[1..]) {
        Ok(cli) => cli,
        Err(early) => {
            if early.status.is_ok() {
                println!("{}", early.output);
                return ExitCode::SUCCESS;
            }
            // argh takes no `--opt=value`; say what it does take.
            if let Some((name, value)) = raw[1..].iter().find_map(|a| {
                let (name, value) = a.split_once('=')?;
                let word = name.strip_prefix("--")?;
                (!word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                    .then_some((name, value))
            }) {
                eprintln!(
                    "error: options take their value after a space: write `{name} {value}`, not `{name}={value}`"
                );
                return ExitCode::from(exit::USAGE);
            }
            eprintln!("{}", early.output.trim_end());
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Err(message) = init_logging(cli.log_level.as_deref()) {
        eprintln!("error: {message}");
        return ExitCode::from(exit::USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Ledger calls run on blocking threads but take turns on one
        // connection: a few threads serve them; hundreds only cost memory.
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(error)
            if error.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // `apex export … | head`: the reader is gone, which is fine.
            ExitCode::SUCCESS
        }
        Err(error) => {
            // One line: the whole cause chain, joined.
            eprintln!("error: {error:#}");
            if error
                .chain()
                .any(|c| c.downcast_ref::<UsageError>().is_some())
            {
                ExitCode::from(exit::USAGE)
            } else {
                exit::code_for(&error)
            }
        }
    }
}

fn init_logging(level: Option<&str>) -> Result<(), String> {
    let level = level.unwrap_or("info").to_ascii_lowercase();
    if !matches!(
        level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace"
    ) {
        return Err(format!(
            "unknown --log-level `{level}`; use error, warn, info, debug or trace"
        ));
    }
    // Dependencies stay at warn: their DEBUG output would show request
    // headers, and API keys live there.
    let filter = format!(
        "warn,apex={level},apex_core={level},apex_store={level},apex_providers={level},apex_cli={level}"
    );
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(progress::LogWriter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
    Ok(())
}
