//! `mock-upstream`: the mock upstream (OpenAI, Azure OpenAI, Anthropic, Gemini) as a process,
//! for tests not written in Rust.
//!
//! It prints exactly one line, `listening http://127.0.0.1:PORT/v1`, once the socket is bound,
//! so a harness that passed `--port 0` learns the port without racing the bind. The other
//! formats live on the same port (see the library docs for their paths).

use clap::Parser;
use gateway_test_support::{Behaviour, MockUpstream};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "mock-upstream",
    about = "A mock OpenAI, Azure OpenAI, Anthropic and Gemini upstream that misbehaves on demand"
)]
struct Args {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Default wait before response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Default number of content pieces per answer.
    #[arg(long)]
    chunks: Option<usize>,
    /// Default pause between SSE events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("mock-upstream: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mock-upstream: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let behaviour = Behaviour {
        delay_ms: args.delay_ms,
        chunks: args.chunks,
        chunk_delay_ms: args.chunk_delay_ms,
        ..Behaviour::default()
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let upstream = MockUpstream::start_with(addr, behaviour).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening {}", upstream.base_url())?;
        stdout.flush()?;
    }
    shutdown_signal().await?;
    drop(upstream);
    Ok(())
}

#[cfg(unix)]
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn shutdown_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
