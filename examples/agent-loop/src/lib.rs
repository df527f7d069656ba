//! A function-calling loop against Airlock, the way an agent framework runs it:
//!
//! 1. fetch the tools in OpenAI's shape (`GET /v1/tools?format=openai`);
//! 2. send the conversation + tools to the model;
//! 3. for each tool call the model makes, `POST /v1/tools/<name>:invoke` with
//!    the model's arguments and append the result as a `tool` message;
//! 4. repeat until the model answers in text.
//!
//! The model here is a script (`script.json`): each turn is what a model
//! would return — tool calls with arguments as a JSON *string*, as OpenAI
//! sends them, or final text. Replace [`ScriptedModel`] with a real
//! Chat Completions call and nothing else changes: the `messages` this loop
//! builds are exactly what the next request would carry.

use serde::Deserialize;
use serde_json::{Value, json};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The script file is unreadable or malformed.
    #[error("The script is not valid: {0}.")]
    Script(String),
    /// Airlock could not be reached or answered with a server error.
    #[error("Airlock request failed: {0}.")]
    Http(String),
    /// The model called a tool that was not offered.
    #[error("The model called {0:?}, which Airlock did not offer.")]
    UnknownTool(String),
    /// The script ran out of turns before a final answer.
    #[error("The script ended without a final answer.")]
    NoAnswer,
}

/// One scripted tool call.
#[derive(Debug, Clone, Deserialize)]
pub struct ScriptedCall {
    /// Call id (`call_1`).
    pub id: String,
    /// Tool name as exported (`kitchen__greet`).
    pub name: String,
    /// Arguments as a JSON string, as OpenAI models return them.
    pub arguments: String,
}

/// One model turn: tool calls, or the final text.
#[derive(Debug, Clone, Deserialize)]
pub struct Turn {
    /// Tool calls.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    /// Final text.
    pub content: Option<String>,
    /// Ignored: explains the turn to a reader of the script.
    #[serde(default)]
    pub comment: Option<String>,
}

/// The script.
#[derive(Debug, Clone, Deserialize)]
pub struct ScriptedModel {
    /// System prompt.
    pub system: String,
    /// The user's request.
    pub user: String,
    /// Model turns, in order.
    pub turns: Vec<Turn>,
}

impl ScriptedModel {
    /// Parse a script.
    ///
    /// # Errors
    /// [`LoopError::Script`].
    pub fn parse(text: &str) -> Result<Self, LoopError> {
        serde_json::from_str(text).map_err(|e| LoopError::Script(e.to_string()))
    }
}

/// A tiny Airlock client.
pub struct Airlock {
    http: reqwest::blocking::Client,
    url: String,
    token: String,
}

impl Airlock {
    /// Client for `url` (e.g. `http://127.0.0.1:8420`) with a bearer token.
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            http: reqwest::blocking::Client::new(),
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// The tools in OpenAI's Chat Completions shape.
    ///
    /// # Errors
    /// [`LoopError::Http`].
    pub fn tools(&self) -> Result<Vec<Value>, LoopError> {
        let v: Value = self
            .http
            .get(format!("{}/v1/tools?format=openai", self.url))
            .bearer_auth(&self.token)
            .send()
            .and_then(reqwest::blocking::Response::error_for_status)
            .and_then(reqwest::blocking::Response::json)
            .map_err(|e| LoopError::Http(e.to_string()))?;
        Ok(v["tools"].as_array().cloned().unwrap_or_default())
    }

    /// Call a tool; returns the text the model should see. Client errors
    /// (bad arguments...) are returned as text too: the model can fix them.
    ///
    /// # Errors
    /// [`LoopError::Http`] for transport failures and 5xx.
    pub fn invoke(&self, name: &str, arguments: &str) -> Result<String, LoopError> {
        let args: Value = match serde_json::from_str(arguments) {
            Ok(v) => v,
            Err(e) => {
                return Ok(
                    json!({"error": {"code": "invalid_json", "field": "arguments",
                    "message": format!("the arguments are not valid JSON: {e}")}})
                    .to_string(),
                );
            }
        };
        let r = self
            .http
            .post(format!("{}/v1/tools/{name}:invoke", self.url))
            .bearer_auth(&self.token)
            .json(&json!({ "arguments": args }))
            .send()
            .map_err(|e| LoopError::Http(e.to_string()))?;
        let status = r.status();
        let body: Value = r.json().map_err(|e| LoopError::Http(e.to_string()))?;
        if status.is_server_error() {
            return Err(LoopError::Http(format!("{status}: {body}")));
        }
        // What the model needs: the value, or the error. Metering and audit
        // ids stay with the application (logged here in the transcript).
        Ok(match body.get("result") {
            Some(r) => r.to_string(),
            None => body.to_string(),
        })
    }
}

/// Run the loop; returns the OpenAI-format `messages` transcript.
///
/// # Errors
/// [`LoopError`].
pub fn run(airlock: &Airlock, model: &ScriptedModel) -> Result<Vec<Value>, LoopError> {
    let tools = airlock.tools()?;
    let offered: Vec<&str> = tools
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    let mut messages = vec![
        json!({"role": "system", "content": model.system}),
        json!({"role": "user", "content": model.user}),
    ];
    for turn in &model.turns {
        // A real model would get `messages` and `tools` here.
        if let Some(text) = &turn.content {
            messages.push(json!({"role": "assistant", "content": text}));
            return Ok(messages);
        }
        messages.push(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": turn.tool_calls.iter().map(|c| json!({
                "id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })).collect::<Vec<_>>(),
        }));
        for call in &turn.tool_calls {
            if !offered.contains(&call.name.as_str()) {
                return Err(LoopError::UnknownTool(call.name.clone()));
            }
            let content = airlock.invoke(&call.name, &call.arguments)?;
            messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
        }
    }
    Err(LoopError::NoAnswer)
}
