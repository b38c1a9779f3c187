//! Finding credential pairs in text (SPEC §8.6): `ak_…` keys and `sk_…` secrets on the same
//! line or on adjacent lines. What is found is checked offline against the master keys by the
//! caller; this only finds candidates and never judges them.

use crate::credential::{ApiKey, ApiSecret, KEY_PREFIX, SECRET_PREFIX};

/// A key and a secret found near each other.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// 1-based line of the key.
    pub line: usize,
    /// The key.
    pub key: ApiKey,
    /// The secret found on the key's line or an adjacent one.
    pub secret: ApiSecret,
}

/// Every (key, secret) pair where the secret is on the key's line, the line before or the line
/// after, in order of the key's position. Tokens are whole words: a key or secret glued to
/// more characters of its alphabet is not one.
pub fn candidates(text: &str) -> Vec<Candidate> {
    let lines: Vec<(Vec<ApiKey>, Vec<ApiSecret>)> = text
        .lines()
        .map(|line| (keys_in(line), secrets_in(line)))
        .collect();
    let mut found = Vec::new();
    for (i, (keys, _)) in lines.iter().enumerate() {
        for key in keys {
            let near = i.saturating_sub(1)..=(i + 1).min(lines.len().saturating_sub(1));
            for j in near {
                for secret in &lines[j].1 {
                    found.push(Candidate {
                        line: i + 1,
                        key: key.clone(),
                        secret: secret.clone(),
                    });
                }
            }
        }
    }
    found
}

/// The whole tokens in `line` that start with `prefix` (not preceded by a character of
/// `alphabet`), with the characters of `alphabet` that follow it.
fn tokens<'a>(
    line: &'a str,
    prefix: &'static str,
    alphabet: fn(u8) -> bool,
) -> impl Iterator<Item = &'a str> {
    let bytes = line.as_bytes();
    line.match_indices(prefix).filter_map(move |(start, _)| {
        if start > 0 && (alphabet(bytes[start - 1]) || bytes[start - 1] == b'_') {
            return None;
        }
        let body = start + prefix.len();
        let end = bytes[body..]
            .iter()
            .position(|&b| !alphabet(b))
            .map_or(bytes.len(), |n| body + n);
        Some(&line[start..end])
    })
}

fn keys_in(line: &str) -> Vec<ApiKey> {
    tokens(line, KEY_PREFIX, |b| b.is_ascii_alphanumeric())
        .filter_map(|t| ApiKey::parse(t).ok())
        .collect()
}

fn secrets_in(line: &str) -> Vec<ApiSecret> {
    tokens(line, SECRET_PREFIX, |b| {
        b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
    })
    .filter_map(|t| ApiSecret::parse(t).ok())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ak_0123456789abcdefghijklmnopqrstuv";
    const SECRET: &str = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo";

    fn found(text: &str) -> Vec<(usize, String)> {
        candidates(text)
            .into_iter()
            .map(|c| (c.line, c.key.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn pairs_on_one_line_or_adjacent_lines_are_found() {
        assert_eq!(
            found(&format!("X_KEY={KEY} X_SECRET={SECRET}")),
            [(1, KEY.into())]
        );
        assert_eq!(
            found(&format!("a\nkey: \"{KEY}\"\nsecret: '{SECRET}'\n")),
            [(2, KEY.into())]
        );
        assert_eq!(found(&format!("{SECRET}\n{KEY}")), [(2, KEY.into())]);
        // Two lines apart is no pair.
        assert!(found(&format!("{KEY}\n\n{SECRET}")).is_empty());
        // In JSON, URLs, headers.
        assert_eq!(
            found(&format!(r#"{{"api_key":"{KEY}","api_secret":"{SECRET}"}}"#)).len(),
            1
        );
        assert_eq!(
            found(&format!(
                "curl -H 'X-Api-Key: {KEY}' -H 'X-Api-Secret: {SECRET}'"
            ))
            .len(),
            1
        );
    }

    #[test]
    fn only_whole_well_formed_tokens_count() {
        // Glued to more of the alphabet: not a key, not a secret.
        assert!(found(&format!("x{KEY} {SECRET}")).is_empty());
        // A key runs to the end of its alphabet: this is another (longer) key.
        assert_eq!(found(&format!("{KEY}0 {SECRET}")), [(1, format!("{KEY}0"))]);
        assert!(found(&format!("{KEY} {SECRET}A")).is_empty());
        assert!(found(&format!("{KEY} _{SECRET}")).is_empty());
        // Too short a key, a secret with padding or a wrong length.
        assert!(found(&format!("ak_short {SECRET}")).is_empty());
        assert!(found(&format!("{KEY} {}", &SECRET[..45])).is_empty());
        // Several on one line: every combination is a candidate.
        let two = format!("{KEY} {SECRET} ak_TestVector2Example00000000000000 {SECRET}");
        assert_eq!(candidates(&two).len(), 4);
        // Not text at all: nothing, no panic.
        assert!(candidates("ak_\u{0}sk_\u{ffff}ak_ é sk_").is_empty());
    }
}
