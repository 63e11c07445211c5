//! `docs/protocol.md`, the WebSocket protocol's one page, held against the code's constants:
//! every frame type, method, error code, close code and token refusal the code defines is on
//! the page, and the page's frame-type and close-code tables name nothing else.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use sai_pipeline::frame::frame_type;
use sai_pipeline::message::method;
use sai_pipeline::token::TokenError;
use sai_proto::close;
use sai_proto::im::ErrorCode;
use std::collections::BTreeSet;

const DOC: &str = include_str!("../../docs/protocol.md");

/// Column `n` (from 1) of every row of the first table under the `## {section}` heading,
/// without backticks.
fn column(section: &str, n: usize) -> Vec<String> {
    let start = DOC
        .find(&format!("\n## {section}\n"))
        .unwrap_or_else(|| panic!("no section {section:?} in docs/protocol.md"));
    let body = &DOC[start + 1..];
    let body = &body[body.find('\n').unwrap()..];
    let body = body.find("\n## ").map_or(body, |end| &body[..end]);
    body.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| l.split('|').nth(n).unwrap().trim().trim_matches('`').to_string())
        .collect()
}

fn first_column(section: &str) -> Vec<String> {
    column(section, 1)
}

#[test]
fn the_frame_type_table_is_the_code_s() {
    let documented: BTreeSet<u8> = first_column("Frames").iter().map(|c| c.parse().unwrap()).collect();
    assert_eq!(documented, frame_type::ALL.into_iter().collect());
}

#[test]
fn the_close_code_table_is_what_the_gateway_sends() {
    let documented: BTreeSet<u16> = first_column("Close codes").iter().map(|c| c.parse().unwrap()).collect();
    assert_eq!(documented, close::SENT.into_iter().collect());
}

#[test]
fn every_error_code_of_the_gateway_is_in_the_error_table_once() {
    let documented = first_column("Error codes");
    let unique: BTreeSet<&String> = documented.iter().collect();
    assert_eq!(unique.len(), documented.len(), "each code once");
    for code in ErrorCode::ALL {
        assert!(
            documented.iter().any(|d| d == code.as_str()),
            "{} undocumented",
            code.as_str()
        );
    }
}

#[test]
fn every_method_and_token_refusal_is_documented() {
    for m in method::ALL {
        assert!(DOC.contains(&format!("`{m}`")), "method {m} undocumented");
    }
    let refusals = column("Upgrade", 2);
    for e in TokenError::ALL {
        assert!(refusals.iter().any(|r| r == e.code()), "{} undocumented", e.code());
    }
}
