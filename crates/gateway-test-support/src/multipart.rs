//! A minimal `multipart/form-data` reader for the transcription endpoint.
//!
//! The workspace has no multipart crate, and the mock needs only each part's name, file name,
//! size and (for text fields) value, so this reads exactly that and refuses what it cannot
//! read rather than guessing.

use serde_json::{Map, Value, json};

/// One part of a form.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Part<'a> {
    pub(crate) name: String,
    /// Set for file parts, the ones whose `Content-Disposition` names a file.
    pub(crate) filename: Option<String>,
    pub(crate) data: &'a [u8],
}

/// The form as the mock records it: a JSON object with each text field as a string and each
/// file part as `{"filename": ..., "bytes": N}`; a name sent more than once becomes an array
/// of its values in order, as repeated fields (`include[]`) are lists.
pub(crate) fn parse_form(content_type: Option<&str>, body: &[u8]) -> Result<Value, String> {
    let boundary = content_type
        .and_then(boundary)
        .ok_or("Expected a multipart/form-data body with a boundary.")?;
    let mut form = Map::new();
    for part in parts(boundary, body)? {
        let value = match &part.filename {
            Some(filename) => json!({"filename": filename, "bytes": part.data.len()}),
            None => Value::String(String::from_utf8_lossy(part.data).into_owned()),
        };
        match form.get_mut(&part.name) {
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = json!([first.take(), value]),
            None => {
                form.insert(part.name, value);
            }
        }
    }
    Ok(Value::Object(form))
}

/// The `boundary` parameter of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .find_map(|param| {
            let (key, value) = param.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| value.trim().trim_matches('"'))
        })
        .filter(|boundary| !boundary.is_empty())
}

/// The parts between the first delimiter and the closing one (RFC 7578 over RFC 2046).
/// The preamble and the epilogue are ignored, as the RFC asks.
fn parts<'a>(boundary: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, String> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let next_delimiter = [b"\r\n".as_slice(), delimiter].concat();
    let unterminated = || "The multipart body ends before its closing boundary.".to_owned();

    // The first delimiter may open the body, without the CRLF that precedes the others.
    let mut pos = if body.starts_with(delimiter) {
        delimiter.len()
    } else {
        find(body, &next_delimiter, 0).ok_or_else(unterminated)? + next_delimiter.len()
    };
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        let line_end = find(body, b"\r\n", pos).ok_or_else(unterminated)?;
        // Transport padding: whitespace may follow a delimiter on its line.
        if !body[pos..line_end]
            .iter()
            .all(|byte| matches!(byte, b' ' | b'\t'))
        {
            return Err("Malformed multipart boundary line.".to_owned());
        }
        // Searching from the CRLF that ends the delimiter line also finds an empty header block.
        let headers_end = find(body, b"\r\n\r\n", line_end).ok_or_else(unterminated)?;
        let headers = if headers_end == line_end {
            ""
        } else {
            std::str::from_utf8(&body[line_end + 2..headers_end])
                .map_err(|_| "Multipart part headers are not UTF-8.".to_owned())?
        };
        let data_start = headers_end + 4;
        let data_end = find(body, &next_delimiter, data_start).ok_or_else(unterminated)?;
        let (name, filename) = disposition(headers)?;
        parts.push(Part {
            name,
            filename,
            data: &body[data_start..data_end],
        });
        pos = data_end + next_delimiter.len();
    }
}

/// The `name` and `filename` of a part's `Content-Disposition: form-data` header.
fn disposition(headers: &str) -> Result<(String, Option<String>), String> {
    let value = headers
        .split("\r\n")
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-disposition")
                .then_some(value)
        })
        .ok_or("A multipart part has no Content-Disposition header.")?;
    let (kind, params) = value.split_once(';').unwrap_or((value, ""));
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return Err(format!(
            "A multipart part is {:?}, not form-data.",
            kind.trim()
        ));
    }
    let params = disposition_params(params);
    let param = |key: &str| {
        params
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    };
    let name = param("name").ok_or("A multipart part has no name.")?;
    Ok((name, param("filename")))
}

/// `key=value` and `key="quoted value"` pairs, keys lowercased. Quoted values may hold `;`
/// (file names do), and `\"` escapes a quote.
fn disposition_params(mut rest: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        let Some((key, after)) = rest.split_once('=') else {
            return params;
        };
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let value;
        if let Some(quoted) = after.strip_prefix('"') {
            let mut unquoted = String::new();
            let mut end = quoted.len();
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                if escaped {
                    unquoted.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    end = i + 1;
                    break;
                } else {
                    unquoted.push(c);
                }
            }
            value = unquoted;
            rest = &quoted[end..];
        } else {
            let end = after.find(';').unwrap_or(after.len());
            value = after[..end].trim().to_owned();
            rest = &after[end..];
        }
        params.push((key, value));
    }
}

/// The first index at or after `from` where `needle` starts.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    #[test]
    fn text_fields_and_file_parts() {
        let body = b"preamble\r\n--XyZ\r\n\
            Content-Disposition: form-data; name=\"model\"\r\n\r\n\
            whisper-1\r\n--XyZ\r\n\
            content-disposition: form-data; name=\"file\"; filename=\"a;b \\\"c\\\".mp3\"\r\n\
            Content-Type: audio/mpeg\r\n\r\n\
            \x00\x01\r\n\x02\r\n--XyZ\r\n\
            Content-Disposition: form-data; name=include[]\r\n\r\n\
            logprobs\r\n--XyZ\r\n\
            Content-Disposition: form-data; name=\"include[]\"\r\n\r\n\
            \r\n--XyZ--\r\nepilogue";
        let form = parse_form(Some(TYPE), body).unwrap();
        assert_eq!(
            form,
            json!({
                "model": "whisper-1",
                "file": {"filename": "a;b \"c\".mp3", "bytes": 5},
                "include[]": ["logprobs", ""],
            })
        );
    }

    #[test]
    fn boundary_forms() {
        assert_eq!(boundary(TYPE), Some("XyZ"));
        assert_eq!(
            boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(boundary("application/json; boundary=x"), None);
    }

    #[test]
    fn opening_delimiter_at_the_start_and_empty_headers() {
        let body = b"--XyZ\r\n\r\nno headers\r\n--XyZ--";
        assert_eq!(
            parse_form(Some(TYPE), body),
            Err("A multipart part has no Content-Disposition header.".to_owned())
        );
        let body = b"--XyZ  \r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--XyZ--";
        assert_eq!(parse_form(Some(TYPE), body), Ok(json!({"a": "1"})));
        assert_eq!(parse_form(Some(TYPE), b"--XyZ--"), Ok(json!({})));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let truncated = b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n\r\n1";
        assert!(parse_form(Some(TYPE), truncated).is_err());
        let no_name = b"--XyZ\r\nContent-Disposition: form-data\r\n\r\n1\r\n--XyZ--";
        assert_eq!(
            parse_form(Some(TYPE), no_name),
            Err("A multipart part has no name.".to_owned())
        );
        let junk = b"--XyZjunk\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--XyZ--";
        assert!(parse_form(Some(TYPE), junk).is_err());
        assert!(parse_form(Some(TYPE), b"no boundary here").is_err());
        assert!(parse_form(None, b"--XyZ--").is_err());
        assert!(parse_form(Some("application/json"), b"{}").is_err());
    }
}
