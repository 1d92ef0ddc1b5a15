//! What the simulator answers: each API's success body, and the same answer
//! as that API's event stream.

use serde_json::{Value, json};

use super::requests::SimApi;

/// A served answer, before it is written in an API's format.
pub(super) struct Answer {
    pub api: SimApi,
    pub id: u64,
    pub model: String,
    pub text: String,
    /// Of `output`, the tokens spent thinking or reasoning.
    pub reasoning: u64,
    pub uncached: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub ttl_1h: bool,
    /// OpenAI: whether usage carries `cache_write_tokens` (GPT-5.6+).
    pub reports_writes: bool,
    pub output: u64,
    /// Stopped at `max_tokens`.
    pub truncated: bool,
    pub store: bool,
}

impl Answer {
    /// The answer to a request: `output` tokens of text (half of them
    /// thinking where the model thinks), with the input split as the cache
    /// served it.
    pub fn of(
        (api, id, model): (SimApi, u64, String),
        parsed: &super::requests::Parsed,
        (uncached, cache_read, cache_write): (u64, u64, u64),
        (output, text): (u64, String),
        truncated: bool,
    ) -> Self {
        Self {
            api,
            id,
            model,
            text,
            reasoning: if parsed.thinks { output / 2 } else { 0 },
            uncached,
            cache_read,
            cache_write,
            ttl_1h: parsed.ttl_1h,
            reports_writes: parsed.reports_writes,
            output,
            truncated,
            store: parsed.store,
        }
    }

    fn chat_usage(&self) -> Value {
        let input = self.uncached + self.cache_read + self.cache_write;
        let mut prompt_details = json!({"cached_tokens": self.cache_read, "audio_tokens": 0});
        if self.reports_writes {
            prompt_details["cache_write_tokens"] = json!(self.cache_write);
        }
        json!({
            "prompt_tokens": input,
            "completion_tokens": self.output,
            "total_tokens": input + self.output,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    }

    fn responses_usage(&self) -> Value {
        let input = self.uncached + self.cache_read + self.cache_write;
        // Always present (the SDK's type requires it); before GPT-5.6
        // writes are not billed apart, so none are reported.
        let writes = if self.reports_writes {
            self.cache_write
        } else {
            0
        };
        let input_details = json!({"cached_tokens": self.cache_read, "cache_write_tokens": writes});
        json!({
            "input_tokens": input,
            "input_tokens_details": input_details,
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": input + self.output
        })
    }

    fn messages_usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.uncached,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": if self.ttl_1h { 0 } else { self.cache_write },
                "ephemeral_1h_input_tokens": if self.ttl_1h { self.cache_write } else { 0 }
            },
            "output_tokens": output,
            "output_tokens_details": {"thinking_tokens": self.reasoning.min(output)},
            "service_tier": "standard"
        })
    }

    fn chat_finish(&self) -> &'static str {
        if self.truncated { "length" } else { "stop" }
    }

    fn stop_reason(&self) -> &'static str {
        if self.truncated {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    /// The response object of the Responses API (also the `response` of
    /// its stream events, `status` and `output` as of that moment).
    fn response_object(&self, status: &str, done: bool) -> Value {
        let created = jiff::Timestamp::now().as_second();
        let mut output = Vec::new();
        if done {
            if self.reasoning > 0 {
                output.push(
                    json!({"id": format!("rs_sim{}", self.id), "type": "reasoning", "summary": []}),
                );
            }
            output.push(json!({
                "id": format!("msg_sim{}", self.id), "type": "message", "role": "assistant",
                "status": if self.truncated { "incomplete" } else { "completed" },
                "content": [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}]
            }));
        }
        json!({
            "id": format!("resp_sim{}", self.id),
            "object": "response",
            "created_at": created,
            "status": status,
            "error": null,
            "incomplete_details": if done && self.truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "store": self.store,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": if done { self.responses_usage() } else { Value::Null },
            "metadata": {}
        })
    }

    /// The answer as one JSON body.
    pub fn body(&self) -> Value {
        match self.api {
            SimApi::Chat => json!({
                "id": format!("chatcmpl-sim{}", self.id),
                "object": "chat.completion",
                "created": jiff::Timestamp::now().as_second(),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": null},
                             "finish_reason": self.chat_finish()}],
                "usage": self.chat_usage()
            }),
            SimApi::Responses => self.response_object(
                if self.truncated {
                    "incomplete"
                } else {
                    "completed"
                },
                true,
            ),
            SimApi::Messages => {
                let mut content = Vec::new();
                if self.reasoning > 0 {
                    content.push(json!({"type": "thinking", "thinking": "Considering the document.", "signature": format!("sig_sim{}", self.id)}));
                }
                content.push(json!({"type": "text", "text": self.text}));
                json!({
                    "id": format!("msg_sim{}", self.id),
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": content,
                    "stop_reason": self.stop_reason(),
                    "stop_sequence": null,
                    "usage": self.messages_usage(self.output)
                })
            }
        }
    }

    /// The text in up to `pieces` deltas, cut at word boundaries.
    fn deltas(&self, pieces: usize) -> Vec<String> {
        let words: Vec<&str> = self.text.split_inclusive(' ').collect();
        let per = words.len().div_ceil(pieces.max(1)).max(1);
        words.chunks(per).map(|c| c.concat()).collect()
    }

    /// The answer as its API's server-sent events, each already framed
    /// (`event:` where the API names events, `data:`, blank line).
    pub fn events(&self) -> Vec<String> {
        let frame = |name: Option<&str>, data: &Value| match name {
            Some(name) => format!("event: {name}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        };
        let deltas = self.deltas(8);
        match self.api {
            SimApi::Chat => {
                let chunk = |delta: Value, finish: Value| {
                    json!({
                        "id": format!("chatcmpl-sim{}", self.id), "object": "chat.completion.chunk",
                        "created": jiff::Timestamp::now().as_second(), "model": self.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
                    })
                };
                let mut events = vec![frame(
                    None,
                    &chunk(
                        json!({"role": "assistant", "content": "", "refusal": null}),
                        Value::Null,
                    ),
                )];
                for d in deltas {
                    events.push(frame(None, &chunk(json!({"content": d}), Value::Null)));
                }
                events.push(frame(None, &chunk(json!({}), json!(self.chat_finish()))));
                events.push(frame(
                    None,
                    &json!({
                        "id": format!("chatcmpl-sim{}", self.id), "object": "chat.completion.chunk",
                        "created": jiff::Timestamp::now().as_second(), "model": self.model,
                        "choices": [], "usage": self.chat_usage()
                    }),
                ));
                events.push("data: [DONE]\n\n".into());
                events
            }
            SimApi::Responses => {
                let mut seq = 0u64;
                let mut next = |kind: &str, mut data: Value| {
                    data["type"] = json!(kind);
                    data["sequence_number"] = json!(seq);
                    seq += 1;
                    frame(Some(kind), &data)
                };
                let item_id = format!("msg_sim{}", self.id);
                let output_index = u64::from(self.reasoning > 0);
                let mut events = vec![
                    next(
                        "response.created",
                        json!({"response": self.response_object("in_progress", false)}),
                    ),
                    next(
                        "response.in_progress",
                        json!({"response": self.response_object("in_progress", false)}),
                    ),
                    next(
                        "response.output_item.added",
                        json!({"output_index": output_index, "item": {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}}),
                    ),
                    next(
                        "response.content_part.added",
                        json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                    ),
                ];
                for d in deltas {
                    events.push(next("response.output_text.delta", json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "delta": d, "logprobs": []})));
                }
                events.push(next("response.output_text.done", json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "text": self.text, "logprobs": []})));
                events.push(next("response.content_part.done", json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "part": {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}})));
                let done = self.response_object(
                    if self.truncated {
                        "incomplete"
                    } else {
                        "completed"
                    },
                    true,
                );
                let item = done["output"]
                    .as_array()
                    .and_then(|o| o.last())
                    .cloned()
                    .unwrap_or_default();
                events.push(next(
                    "response.output_item.done",
                    json!({"output_index": output_index, "item": item}),
                ));
                let terminal = if self.truncated {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(next(terminal, json!({"response": done})));
                events
            }
            SimApi::Messages => {
                let mut start = self.body();
                start["content"] = json!([]);
                start["stop_reason"] = Value::Null;
                start["usage"] = self.messages_usage(1);
                let mut events = vec![
                    frame(
                        Some("message_start"),
                        &json!({"type": "message_start", "message": start}),
                    ),
                    frame(Some("ping"), &json!({"type": "ping"})),
                ];
                let mut index = 0;
                if self.reasoning > 0 {
                    events.push(frame(Some("content_block_start"), &json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})));
                    events.push(frame(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": "Considering the document."}})));
                    events.push(frame(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": format!("sig_sim{}", self.id)}})));
                    events.push(frame(
                        Some("content_block_stop"),
                        &json!({"type": "content_block_stop", "index": index}),
                    ));
                    index += 1;
                }
                events.push(frame(Some("content_block_start"), &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
                for d in deltas {
                    events.push(frame(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": d}})));
                }
                events.push(frame(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": index}),
                ));
                events.push(frame(Some("message_delta"), &json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null}, "usage": {"output_tokens": self.output, "output_tokens_details": {"thinking_tokens": self.reasoning}}})));
                events.push(frame(
                    Some("message_stop"),
                    &json!({"type": "message_stop"}),
                ));
                events
            }
        }
    }
}
