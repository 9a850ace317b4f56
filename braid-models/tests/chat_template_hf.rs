//! Renders real chat templates (SmolLM2, Llama-3, Qwen3, Mistral and one that exercises the
//! Jinja features HF templates use) and compares with what transformers'
//! `apply_chat_template(..., tokenize=False)` produced (scripts/make_tokenizer_fixtures.py).

use std::collections::BTreeMap;
use std::path::Path;

use braid_models::chat_template::{ChatMessage, ChatTemplate};
use braid_models::ModelError;
use serde::Deserialize;

#[derive(Deserialize)]
struct TemplateSpec {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(Deserialize)]
struct Render {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    extra: serde_json::Map<String, serde_json::Value>,
    expected: String,
}

#[derive(Deserialize)]
struct RejectedConversation {
    template: String,
    conversation: String,
    message: String,
}

#[derive(Deserialize)]
struct Fixture {
    templates: BTreeMap<String, TemplateSpec>,
    conversations: BTreeMap<String, Vec<ChatMessage>>,
    renders: Vec<Render>,
    errors: Vec<RejectedConversation>,
}

fn fixture() -> Fixture {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn compile(spec: &TemplateSpec) -> ChatTemplate {
    ChatTemplate::new(&spec.source, spec.bos_token.clone(), spec.eos_token.clone()).unwrap()
}

#[test]
fn renders_match_transformers() {
    let fixture = fixture();
    let templates: BTreeMap<&str, ChatTemplate> = fixture
        .templates
        .iter()
        .map(|(name, spec)| (name.as_str(), compile(spec)))
        .collect();
    for name in ["smollm2", "llama3", "qwen3", "mistral", "features"] {
        assert!(
            fixture.renders.iter().any(|r| r.template == name),
            "no renders of {name}"
        );
    }
    let mut failures = Vec::new();
    for render in &fixture.renders {
        let messages = &fixture.conversations[&render.conversation];
        let got = templates[render.template.as_str()]
            .render_with(messages, render.add_generation_prompt, &render.extra)
            .unwrap();
        if got != render.expected {
            failures.push(format!(
                "{} / {} / generation prompt {} / {:?}:\n  got      {got:?}\n  expected {:?}",
                render.template,
                render.conversation,
                render.add_generation_prompt,
                render.extra,
                render.expected
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn render_is_render_with_no_extra_variables() {
    let fixture = fixture();
    let spec = &fixture.templates["smollm2"];
    let template = compile(spec);
    let messages = &fixture.conversations["multi_turn"];
    let expected = fixture
        .renders
        .iter()
        .find(|r| {
            r.template == "smollm2" && r.conversation == "multi_turn" && r.add_generation_prompt
        })
        .unwrap();
    assert_eq!(template.render(messages, true).unwrap(), expected.expected);
}

#[test]
fn raise_exception_reaches_the_caller() {
    let fixture = fixture();
    assert!(!fixture.errors.is_empty());
    for rejected in &fixture.errors {
        let template = compile(&fixture.templates[&rejected.template]);
        let err = template
            .render(&fixture.conversations[&rejected.conversation], false)
            .unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
        assert!(err.to_string().contains(&rejected.message), "{err}");
    }
}

#[test]
fn chat_messages_deserialize_from_openai_style_json() {
    let messages: Vec<ChatMessage> = serde_json::from_str(
        r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]"#,
    )
    .unwrap();
    assert_eq!(
        messages,
        vec![
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo")
        ]
    );
}
