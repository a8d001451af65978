//! Gemini generateContent <-> OpenAI chat completions translation (work in progress).
