//! ARM's `CloudError` body: `{"error":{"code","message","target"?,"details":[...]}}`
//! (what the Azure SDKs parse), plus the headers some errors carry.

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct ArmError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// The rarer parts, boxed to keep `Result<_, ArmError>` small.
    pub more: Box<More>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct More {
    pub target: Option<String>,
    pub details: Vec<Value>,
    pub innererror: Option<Value>,
    /// Extra response headers (e.g. `Retry-After`, rate-limit headers).
    pub headers: Vec<(String, String)>,
}

impl ArmError {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            more: Box::default(),
        }
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.more.target = Some(target.into());
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.more.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn body(&self) -> Value {
        let mut err =
            json!({"code": self.code, "message": self.message, "details": self.more.details});
        if let Some(t) = &self.more.target {
            err["target"] = json!(t);
        }
        if let Some(i) = &self.more.innererror {
            err["innererror"] = i.clone();
        }
        json!({ "error": err })
    }

    /// 400 `InvalidRequestContent` with the Newtonsoft-style wrapper ARM uses
    /// (`The request content was invalid and could not be deserialized: …`).
    pub fn invalid_content(inner: impl std::fmt::Display) -> Self {
        Self::new(
            400,
            "InvalidRequestContent",
            format!("The request content was invalid and could not be deserialized: '{inner}'."),
        )
    }
}
