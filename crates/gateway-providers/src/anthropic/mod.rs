//! Anthropic Messages API <-> OpenAI chat completions translation (work in progress).
