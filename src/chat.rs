//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template` in a GGUF file,
//! `chat_template` in an HF dir's `tokenizer_config.json`), rendered with minijinja as
//! transformers' `apply_chat_template` renders it.
//!
//! For training, a prompt/completion record becomes a one-turn conversation: the prompt is the
//! rendered user turn plus the generation prompt (e.g. `<|im_start|>assistant\n`), the
//! completion is the rest of the rendered two-turn conversation (the answer and the template's
//! end-of-turn text), so the model learns to end its turn as the template does.

use std::path::Path;

use minijinja::{context, Environment};
use serde::Serialize;

use crate::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A model's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// A template from its Jinja source; `bos_token` and `eos_token` are the texts the template
    /// may refer to. Errors when the source does not compile.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let t = Self { source: source.into(), bos_token: bos_token.into(), eos_token: eos_token.into() };
        t.environment()?;
        Ok(t)
    }

    /// The template of a model: a GGUF file's `tokenizer.chat_template`; in an HF directory,
    /// `chat_template.jinja` (transformers 5) or else `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of named templates of which `default` is taken), with the BOS and
    /// EOS tokens of `tokenizer_config.json`. `None` when the model has none.
    pub fn from_model(path: &Path) -> Result<Option<Self>> {
        if path.is_dir() {
            let config = path.join("tokenizer_config.json");
            let json: serde_json::Value = match std::fs::read_to_string(&config) {
                Ok(text) => serde_json::from_str(&text)
                    .map_err(|e| Error::Config { path: config.clone(), reason: e.to_string() })?,
                Err(_) => serde_json::Value::Null,
            };
            let jinja = path.join("chat_template.jinja");
            let source = match &json["chat_template"] {
                _ if jinja.exists() => std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?,
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(named) => match named.iter().find(|t| t["name"] == "default") {
                    Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
                    None => return Err(Error::config("chat_template", "a list of templates without a `default`")),
                },
                _ => return Ok(None),
            };
            let token = |key: &str| match &json[key] {
                serde_json::Value::String(s) => s.clone(),
                v => v["content"].as_str().unwrap_or_default().to_string(),
            };
            Self::new(&source, &token("bos_token"), &token("eos_token")).map(Some)
        } else {
            let meta = crate::gguf::GgufMetadata::read(path)?;
            let Ok(source) = meta.string("tokenizer.chat_template") else { return Ok(None) };
            let tokens = meta.strings("tokenizer.ggml.tokens")?;
            let token =
                |key: &str| meta.u32(key).ok().and_then(|id| tokens.get(id as usize).cloned()).unwrap_or_default();
            Self::new(&source, &token("tokenizer.ggml.bos_token_id"), &token("tokenizer.ggml.eos_token_id")).map(Some)
        }
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        // Python string methods (`.strip()`, `.startswith()`, ...) that HF templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| Error::config("chat_template", e.to_string()))?;
        Ok(env)
    }

    /// The conversation as text; `add_generation_prompt` appends the start of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let template = env.get_template("chat").map_err(|e| Error::config("chat_template", e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::config("chat_template", format!("rendering failed: {e}")))
    }

    /// A prompt/completion pair as a one-turn conversation: `(rendered user turn + generation
    /// prompt, rest of the rendered conversation)`. Errors when the template does not render the
    /// prompt as a prefix of the conversation.
    pub fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<(String, String)> {
        let user = Message::new("user", prompt);
        let head = self.render(std::slice::from_ref(&user), true)?;
        let full = self.render(&[user, Message::new("assistant", completion)], false)?;
        match full.strip_prefix(&head) {
            Some(rest) => Ok((head, rest.to_string())),
            None => Err(Error::config(
                "chat_template",
                "the rendered prompt is not a prefix of the rendered conversation; format the data yourself",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_methods_and_raise_exception_work_and_bad_templates_are_errors() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
             {{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}\n\
             {% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
            "<s>",
            "</s>",
        )?;
        assert_eq!(t.render(&[Message::new("user", "  hi ")], true)?, "<s>[USER] hi\n[ASSISTANT]");
        let (p, c) = t.prompt_completion("hi", "yo")?;
        assert_eq!((p.as_str(), c.as_str()), ("<s>[USER] hi\n[ASSISTANT]", " yo\n"));
        // A generation prompt that the conversation does not start its answer with.
        let odd = ChatTemplate::new("{{ messages[0].content }}{% if add_generation_prompt %}<gen>{% endif %}", "", "")?;
        assert!(odd.prompt_completion("hi", "yo").unwrap_err().to_string().contains("not a prefix"));
        let e = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
        assert!(e.contains("bad role tool"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        Ok(())
    }
}
