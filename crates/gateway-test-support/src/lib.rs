//! Test support: a real mock upstream server speaking OpenAI JSON and SSE, with faults on demand.
