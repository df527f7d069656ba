//! Tool descriptions in each consumer's exact shape.
//!
//! * OpenAI (Chat Completions `tools`): `{"type": "function", "function":
//!   {"name", "description", "parameters"}}`.
//! * Anthropic (Messages `tools`): `{"name", "description", "input_schema"}`.
//! * MCP (`tools/list` result entries): `{"name", "title", "description",
//!   "inputSchema", "outputSchema"}`. MCP requires `outputSchema` and
//!   `structuredContent` to be objects, so the tool's result is wrapped as
//!   `{"result": <value>}` (see [`mcp_structured`]).
//!
//! Names are `<component>__<tool>` and match `^[a-zA-Z0-9_-]{1,64}$`, which all
//! three accept.

use super::OfferedTool;
use serde_json::{Value, json};

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// OpenAI function calling.
    Openai,
    /// Anthropic tool use.
    Anthropic,
    /// MCP tools/list.
    Mcp,
}

fn description(t: &OfferedTool) -> String {
    match &t.tool.description {
        Some(d) if !d.trim().is_empty() => d.trim().to_string(),
        _ => format!(
            "Tool {} of component {} (no description in its WIT).",
            t.tool.name, t.component
        ),
    }
}

/// One tool in `format`.
pub fn tool(t: &OfferedTool, format: Format) -> Value {
    match format {
        Format::Openai => json!({
            "type": "function",
            "function": {
                "name": t.name,
                "description": description(t),
                "parameters": t.tool.parameters,
            }
        }),
        Format::Anthropic => json!({
            "name": t.name,
            "description": description(t),
            "input_schema": t.tool.parameters,
        }),
        Format::Mcp => json!({
            "name": t.name,
            "title": format!("{} / {}", t.component, t.tool.name),
            "description": description(t),
            "inputSchema": t.tool.parameters,
            "outputSchema": {
                "type": "object",
                "properties": {"result": t.tool.result},
                "required": ["result"],
                "additionalProperties": false,
            },
        }),
    }
}

/// `{"tools": [...]}` — the field as it goes into each vendor's request (or
/// the MCP `tools/list` result).
pub fn tools(list: &[OfferedTool], format: Format) -> Value {
    json!({ "tools": list.iter().map(|t| tool(t, format)).collect::<Vec<_>>() })
}

/// The MCP `structuredContent` for a tool result.
pub fn mcp_structured(value: &Value) -> Value {
    json!({ "result": value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> OfferedTool {
        OfferedTool {
            name: "c__greet".into(),
            component: "c".into(),
            tool: airlock_wasm_tools::Tool {
                name: "greet".into(),
                interface: None,
                function: "greet".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"name": {"type": "string"}}}),
                result: json!({"type": "string"}),
                param_types: vec![],
                result_type: None,
            },
        }
    }

    #[test]
    fn each_format_has_the_vendor_fields() {
        let t = offered();
        let o = tool(&t, Format::Openai);
        assert_eq!(o["type"], "function");
        assert_eq!(o["function"]["name"], "c__greet");
        assert_eq!(o["function"]["parameters"]["type"], "object");
        let a = tool(&t, Format::Anthropic);
        assert_eq!(a["input_schema"]["type"], "object");
        assert!(a.get("parameters").is_none());
        let m = tool(&t, Format::Mcp);
        assert_eq!(m["inputSchema"]["type"], "object");
        assert_eq!(m["outputSchema"]["properties"]["result"]["type"], "string");
        assert!(m["description"].as_str().unwrap().contains("greet"));
    }
}
