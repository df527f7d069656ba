//! `agent-loop --url http://127.0.0.1:8420 --script examples/agent-loop/script.json`
//! (token from `AIRLOCK_TOKEN`): plays a scripted model's tool calls against
//! Airlock and prints the transcript.

use agent_loop::{Airlock, ScriptedModel, run};
use anyhow::Context;
use clap::Parser;
use std::io::Write;

#[derive(Parser)]
#[command(about = "Play a scripted model's tool calls against Airlock and print the transcript")]
struct Args {
    /// Airlock base URL.
    #[arg(long, default_value = "http://127.0.0.1:8420")]
    url: String,
    /// The scripted model (JSON).
    #[arg(long)]
    script: std::path::PathBuf,
    /// Print the messages as JSON instead of a readable transcript.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let token = std::env::var("AIRLOCK_TOKEN").context("set AIRLOCK_TOKEN to an invoker token")?;
    let text = std::fs::read_to_string(&a.script)
        .with_context(|| format!("cannot read {}", a.script.display()))?;
    let model = ScriptedModel::parse(&text)?;
    let messages = run(&Airlock::new(&a.url, &token), &model)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &messages)?;
        writeln!(out)?;
        return Ok(());
    }
    for m in &messages {
        let role = m["role"].as_str().unwrap_or("?");
        if let Some(calls) = m["tool_calls"].as_array() {
            for c in calls {
                writeln!(
                    out,
                    "{role:>9} → {}({})",
                    c["function"]["name"].as_str().unwrap_or(""),
                    c["function"]["arguments"].as_str().unwrap_or("")
                )?;
            }
        } else {
            writeln!(out, "{role:>9}: {}", m["content"].as_str().unwrap_or(""))?;
        }
    }
    Ok(())
}
