//! Test support: a real mock upstream server speaking the OpenAI, Azure OpenAI, Anthropic and
//! Gemini APIs (JSON and SSE), with faults on demand.
//!
//! [`MockUpstream`] is an HTTP server on a real socket (HTTP/1.1 and HTTP/2 prior knowledge), so
//! the gateway's own client, connection pooling and streaming are exercised exactly as against a
//! vendor. The `mock-upstream` binary wraps the same server for tests written in other languages.
//! One server answers every format, with one set of [`MockStats`], one request log
//! ([`MockUpstream::requests`]) and one [`Behaviour`].
//!
//! # Endpoints
//!
//! | Format | Endpoint (all `POST`) | Base URL for the gateway |
//! |---|---|---|
//! | OpenAI | `/v1/chat/completions`, `/v1/embeddings` (also without `/v1`) | [`MockUpstream::base_url`] |
//! | Anthropic | `/v1/messages` (also `/messages`) | [`MockUpstream::anthropic_base_url`] |
//! | Gemini | `/v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`, `:embedContent`, `:batchEmbedContents` (also under `/v1/models/`) | [`MockUpstream::gemini_base_url`] |
//! | Azure OpenAI | `/openai/deployments/{deployment}/chat/completions?api-version=...`, `.../embeddings?api-version=...` | [`MockUpstream::azure_base_url`] |
//! | OpenAI pass-through | `/v1/responses`, `/v1/images/generations`, `/v1/audio/speech`, `/v1/audio/transcriptions` (also without `/v1`) | [`MockUpstream::base_url`] |
//! | Azure pass-through | `/openai/responses?api-version=...`; `/openai/deployments/{deployment}/images/generations`, `.../audio/speech`, `.../audio/transcriptions` (each `?api-version=...`) | [`MockUpstream::azure_base_url`] |
//!
//! Another method on these paths is a 405, an unknown Gemini method a 404. Besides:
//!
//! - `GET /v1/models`: one model, `mock-model`.
//! - `GET /mock/stats`: [`MockStats`] as JSON.
//! - `POST /mock/reset`: same as [`MockUpstream::reset`].
//! - `POST /mock/config`: a [`Behaviour`] JSON body becomes the default behaviour.
//! - `GET /health`: 200.
//!
//! # What every vendor request gets
//!
//! Request number `n` is a per-server counter starting at 1, never reset, shared by every
//! request to a vendor endpoint above (chat, embeddings and pass-through, all formats,
//! refused ones too). Every answer carries the header `x-request-id: req-up-<n>`, error
//! answers included, and ids derive from `n`: `chatcmpl-up-<n>`, `call_up_<n>`, `msg_up_<n>`,
//! `toolu_up_<n>`, `gem-up-<n>`, `resp_up_<n>`. Each such request is recorded (method, path,
//! raw query, headers, JSON body; a multipart form as described in
//! [`RecordedRequest::body`]) before anything else happens, so a test can inspect what was
//! refused. Each is counted in one of [`MockStats::chat_requests`],
//! [`MockStats::embedding_requests`] and [`MockStats::passthrough_requests`].
//!
//! In order, a request is then:
//!
//! 1. refused if the vendor would refuse its headers or URL (see each format below);
//! 2. refused with a 400 if its body is not JSON (transcriptions: not a readable
//!    `multipart/form-data` form), or lacks what a pass-through endpoint requires (see
//!    below);
//! 3. given its [`Behaviour`]: the default, with the format's directive text applied on top;
//! 4. counted in [`MockStats::images_seen`], delayed by `delay_ms`, and answered with the
//!    injected `status` (plus `Retry-After`) if there is one;
//! 5. answered.
//!
//! Refusals and injected errors use the vendor's error shape; the mock's own routing and
//! control-endpoint errors use OpenAI's.
//!
//! # The answer, in every format
//!
//! The text is `C` pieces `"tok0 "`, `"tok1 "`, ... concatenated (`C` = [`Behaviour::chunks`],
//! default 5), so with the defaults it is `"tok0 tok1 tok2 tok3 tok4 "`. Token counts are
//!
//! ```text
//! completion tokens = C                    (tool calls too)
//! prompt tokens     = P = ceil(S / 4) + 1
//! total             = P + C
//! ```
//!
//! where `S` is a number of characters (Unicode scalar values, Python's `len`) of the prompt
//! text, counted per format:
//!
//! - OpenAI and Azure: every message whose `content` is a JSON string; array contents count
//!   nothing.
//! - Anthropic: `system` (a string or `text` blocks) and every message's string content or
//!   `text` blocks; `tool_result`, `image` and other blocks count nothing.
//! - Gemini: every `text` part of `systemInstruction` and of `contents`.
//!
//! A `[[mock ...]]` directive is part of the prompt text, so it counts too.
//!
//! **Tool calls.** When the request defines tools (OpenAI `tools[].function`, Anthropic
//! `tools[]`, Gemini `tools[].functionDeclarations[]`) and its last message is not a tool result
//! (OpenAI `role: "tool"` or `"function"`, Anthropic user message with a `tool_result` block,
//! Gemini content with a `functionResponse` part), the answer calls the request's FIRST tool
//! with arguments `{"location":"Paris"}` instead of answering text. A tool choice of "none"
//! (OpenAI `tool_choice: "none"`, Anthropic `{"type": "none"}`, Gemini
//! `toolConfig.functionCallingConfig.mode: "NONE"`) also answers text. [`Behaviour::tool_call`]
//! overrides the rule. Streamed, the arguments arrive as two fragments, `{"location":` and
//! `"Paris"}`.
//!
//! **Images** (OpenAI `image_url` parts, Anthropic `image` blocks with any source, also inside
//! `tool_result`, Gemini `inlineData`/`fileData` parts) are accepted, counted in
//! [`MockStats::images_seen`], and do not change the answer.
//!
//! **Embeddings** are 8 numbers per input, a function of the input text only: byte `j` (least
//! significant first) of the 64-bit FNV-1a hash of the text's UTF-8 bytes, as
//! `(byte - 128) / 128`. These are multiples of 1/128 and so compare exactly.
//!
//! # OpenAI (`POST /v1/chat/completions`)
//!
//! `{"id":"chatcmpl-up-<n>","object":"chat.completion","created":...,"model":<echo>,
//! "choices":[{"index":0,"message":{"role":"assistant","content":<text>},
//! "finish_reason":"stop"}],"usage":{"prompt_tokens":P,"completion_tokens":C,
//! "total_tokens":P+C}}`. A tool call has `"content": null`, `"tool_calls": [{"id":
//! "call_up_<n>","type":"function","function":{"name":...,"arguments":"{\"location\":\"Paris\"}"}}]`
//! and `finish_reason: "tool_calls"`.
//!
//! With `"stream": true`, `data: <json>\n\n` events, each its own body frame: a role chunk
//! (`{"role":"assistant","content":""}`; for a tool call `"content": null` and the
//! `tool_calls` entry with the name and empty arguments), `C` content chunks (for a tool call,
//! the two argument fragments), a finish chunk (`delta: {}`, `finish_reason`), then only if
//! `stream_options.include_usage` is true a usage chunk (`"choices": []`), and finally
//! `data: [DONE]`. As OpenAI does, when usage was asked for every other chunk carries
//! `"usage": null`. The in-band stream error is `data: {"error":{"message":...,
//! "type":"server_error","param":null,"code":null}}`, after which the stream ends (no
//! `[DONE]`).
//!
//! Errors: `{"error":{"message":"mock upstream error <status>","type":...,"param":null,
//! "code":null}}`, type `rate_limit_error` for 429 and `server_error` otherwise; the mock's
//! refusals (bad JSON, Azure's checks) have type `invalid_request_error`.
//!
//! `POST /v1/embeddings` (input a string or an array): `{"object":"list","data":[{"object":
//! "embedding","index":i,"embedding":[8 numbers]}],"model":<echo>,"usage":{"prompt_tokens":P,
//! "total_tokens":P}}`, `S` counting the string inputs; a non-string item (token array) is
//! embedded as its JSON text.
//!
//! # Azure OpenAI (`/openai/deployments/{deployment}/...`)
//!
//! Exactly the OpenAI answers, chat and embeddings, with `model` = the deployment name.
//! Refused (OpenAI shape): no `api-version` query parameter, or one not `YYYY-MM-DD` or
//! `YYYY-MM-DD-preview` (400); no `api-key` header (401; `Authorization` does not count).
//!
//! # Anthropic (`POST /v1/messages`)
//!
//! `{"id":"msg_up_<n>","type":"message","role":"assistant","model":<echo>,"content":[{"type":
//! "text","text":<text>}],"stop_reason":"end_turn","stop_sequence":null,"usage":{
//! "input_tokens":P,"output_tokens":C,"cache_read_input_tokens":0,
//! "cache_creation_input_tokens":0}}`. A tool call's content is `[{"type":"tool_use","id":
//! "toolu_up_<n>","name":...,"input":{"location":"Paris"}}]` with `stop_reason: "tool_use"`.
//!
//! With `"stream": true`, `event: NAME\ndata: JSON\n\n` events, each its own frame:
//! `message_start` (the message with empty `content`, null `stop_reason`, usage
//! `input_tokens: P, output_tokens: 1`), `ping`, `content_block_start` (index 0, an empty text
//! block or the `tool_use` block with `input: {}`), `C` `content_block_delta`s (`text_delta`
//! `"tokI "`; for a tool call two `input_json_delta` `partial_json` fragments),
//! `content_block_stop`, `message_delta` (`stop_reason`, `usage: {"output_tokens": C}`),
//! `message_stop`. The in-band stream error is `event: error` with
//! `{"type":"error","error":{"type":"overloaded_error","message":...}}`, after which the stream
//! ends.
//!
//! Refused: no `anthropic-version` header (400). `x-api-key` is recorded, not required.
//! Errors: `{"type":"error","error":{"type":T,"message":"mock upstream error <status>"}}` with
//! `T` = `invalid_request_error` (400, 422), `authentication_error` (401), `permission_error`
//! (403), `not_found_error` (404), `request_too_large` (413), `rate_limit_error` (429),
//! `overloaded_error` (529), `api_error` (anything else).
//!
//! # Gemini (`POST /v1beta/models/{model}:...`)
//!
//! `generateContent`: `{"candidates":[{"content":{"role":"model","parts":[{"text":<text>}]},
//! "finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":P,
//! "candidatesTokenCount":C,"totalTokenCount":P+C},"modelVersion":<model from the path>,
//! "responseId":"gem-up-<n>"}`. A tool call's part is `{"functionCall":{"name":...,
//! "args":{"location":"Paris"}}}` (still `finishReason: "STOP"`).
//!
//! `streamGenerateContent?alt=sse`: `C` `data:` payloads of the same shape, each with one text
//! part `"tokI "`; only the last has `finishReason` and `usageMetadata`. A tool call comes as
//! one payload; with `C` = 0, one finishing payload has an empty text part. No `[DONE]`: the
//! stream just ends. The in-band stream error is a
//! `data: {"error":{"code":503,"message":...,"status":"UNAVAILABLE"}}` payload.
//!
//! `batchEmbedContents`: `{"embeddings":[{"values":[8 numbers]}, ...]}`, one per item of
//! `requests`, embedding the joined text parts of its `content`; `embedContent`:
//! `{"embedding":{"values":[...]}}`. No usage, as Gemini.
//!
//! Refused: a `key` query parameter (400; the gateway must never put keys in URLs, which end
//! up in logs), then no `x-goog-api-key` header (403), then a `streamGenerateContent` without
//! `alt=sse` (400). Errors: `{"error":{"code":<status>,"message":...,"status":S}}`, `S` the
//! Google RPC status (`INVALID_ARGUMENT` 400, `UNAUTHENTICATED` 401, `PERMISSION_DENIED` 403,
//! `NOT_FOUND` 404, `RESOURCE_EXHAUSTED` 429, `UNAVAILABLE` 503, `DEADLINE_EXCEEDED` 504,
//! `INTERNAL` other 5xx, ...); with `retry_after_secs` also a `google.rpc.RetryInfo` detail.
//! Field names are read in camelCase or snake_case, as Gemini accepts both.
//!
//! # OpenAI pass-through endpoints
//!
//! The gateway forwards these without translating them, so the answers only need to be
//! OpenAI's shapes with usage where OpenAI reports it. Azure serves the same answers under its
//! paths, with the Azure checks above; Azure's Responses API is per resource
//! (`/openai/responses`, the model in the body), so `/openai/deployments/{d}/responses` is a
//! 404 as on Azure. Refusals are 400s with type `invalid_request_error`.
//!
//! **`POST /v1/responses`.** `input` is a string or an array of items; `P` counts the
//! characters of `instructions` (a string) and of the input: a string input, or each item's
//! string `content` or its `input_text` and `output_text` parts (`input_image` parts count
//! nothing and are counted in [`MockStats::images_seen`]; other items, such as
//! `function_call_output`, count nothing). The answer is always text, even when the request
//! defines tools:
//!
//! `{"id":"resp_up_<n>","object":"response","created_at":<unix>,"status":"completed",
//! "model":<echo>,"output":[{"type":"message","id":"msg_up_<n>","status":"completed",
//! "role":"assistant","content":[{"type":"output_text","text":<text>,"annotations":[]}]}],
//! "usage":{"input_tokens":P,"input_tokens_details":{"cached_tokens":0},"output_tokens":C,
//! "output_tokens_details":{"reasoning_tokens":0},"total_tokens":P+C}}`.
//!
//! With `"stream": true`, `event: NAME\ndata: JSON\n\n` events, each its own frame, each
//! JSON with its `type` (= `NAME`) and a `sequence_number` counting from 0:
//! `response.created` and `response.in_progress` (`response`: the object above with
//! `status: "in_progress"`, `output: []`, `usage: null`), `response.output_item.added`
//! (`output_index: 0`, `item`: the message with `status: "in_progress"`, `content: []`),
//! `response.content_part.added` (`item_id: "msg_up_<n>"`, `output_index: 0`,
//! `content_index: 0`, `part`: an empty `output_text`), `C` `response.output_text.delta`s
//! (`item_id`, `output_index`, `content_index`, `delta: "tokI "`; sequence numbers 4 to
//! `3 + C`), `response.output_text.done` (`text`), `response.content_part.done` (`part` with
//! the text), `response.output_item.done` (the completed message) and `response.completed`
//! (`response`: the whole object above, usage included). The in-band stream error is
//! `event: error` with `{"type":"error","code":"server_error","message":"mock upstream error",
//! "sequence_number":k}`, `k` the number the next event would have had, after which the stream
//! ends.
//!
//! **`POST /v1/images/generations`** (`prompt` required; `"stream": true` is refused, the mock
//! does not stream images): `{"created":<unix>,"data":[{"b64_json":B}, ...],"usage":
//! {"input_tokens":P,"output_tokens":O,"total_tokens":P+O,"input_tokens_details":
//! {"text_tokens":P,"image_tokens":0}}}`, with `B` = [`IMAGE_PNG_BASE64`] (a 1×1 transparent
//! PNG), `N` = `n` (default 1, clamped to 1..=10) items in `data`, `O` = 1056 × `N` (what one 1024×1024 medium-quality gpt-image-1 image costs) and
//! `P` counting the characters of `prompt`. `response_format`, `size` and `quality` are
//! recorded, not honoured.
//!
//! **`POST /v1/audio/speech`** (JSON with `model`, `input`, `voice`; `input` required,
//! `response_format` one of `mp3` (default), `opus`, `aac`, `flac`, `wav`, `pcm`;
//! `stream_format: "sse"` is refused): a binary body of 1024 bytes with `content-type` per
//! format (`audio/mpeg` for mp3, `audio/<format>` otherwise) and no usage, as OpenAI. The bytes
//! are a function of `input` only: a 64-bit state starts at the FNV-1a hash of its UTF-8
//! bytes; 128 times, `state = state * 6364136223846793005 + 1442695040888963407` (wrapping),
//! then the state's 8 bytes little-endian. The body goes out in 4 frames of 256 bytes, played
//! like a stream: counted in the stream stats, paced by `chunk_delay_ms`, cut by
//! `reset_after_chunks` (which counts frames); `stream_error_after_chunks` does not apply, as
//! audio has no in-band error.
//!
//! **`POST /v1/audio/transcriptions`** (`multipart/form-data`): a `file` part (one part with a
//! file name) is required, as are readable form syntax and a boundary; text fields such as
//! `model`, `language` and `prompt` are recorded. `response_format` `json` (default):
//! `{"text":<text>,"usage":{"type":"tokens","input_tokens":50,"input_token_details":
//! {"audio_tokens":50,"text_tokens":0},"output_tokens":C,"total_tokens":50+C}}`, the 50 fixed
//! whatever the audio; `text`: the text alone as `text/plain`. Other formats (`verbose_json`,
//! `srt`, `vtt`, ...) and `stream=true` are refused: the mock does not imitate them.
//!
//! # Faults
//!
//! See [`Behaviour`] for what can be injected, and [`MockUpstream::set_behaviour`] or the
//! per-request directive `[[mock status=429 retry_after_secs=3]]` for how. The directive is
//! read from the format's last prompt text:
//!
//! - OpenAI and Azure chat: the last message whose content is a string;
//! - Anthropic: the last message with a string content or `text` blocks (joined);
//! - Gemini: the last content with `text` parts (joined);
//! - embeddings: the last string input (OpenAI, Azure), the last request's text (Gemini);
//! - Responses API: a string `input`, or the text of the last `role: "user"` item that has
//!   any (its string content, or its `input_text` and `output_text` parts joined);
//! - image generations and transcriptions: the `prompt` field; speech: `input`.
//!
//! `chunks` sets the text of Responses and transcriptions as it does for chat. In a stream,
//! `reset_after_chunks` and `stream_error_after_chunks` count content events: text pieces
//! (Responses: `response.output_text.delta` events), or the argument fragments of a tool call
//! (Gemini: payloads; speech: 256-byte frames).

mod anthropic;
mod behaviour;
mod endpoint;
mod gemini;
mod media;
mod multipart;
mod openai;
mod reply;
mod responses;
mod server;
mod stream;

pub use behaviour::Behaviour;
pub use media::IMAGE_PNG_BASE64;
pub use server::{BilledUsage, MockStats, MockUpstream, RecordedRequest};
