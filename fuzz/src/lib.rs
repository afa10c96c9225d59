//! What the fuzz targets share: the documented rules an accepted value must meet, written as
//! assertions. The targets never validate anything themselves — they call the agent's own
//! decoders and validation and check what those accept.

use election_agent::{
    election::CONTROLLER_KIND,
    lease::{DEFAULT_KIND, ElectionKey, InvalidArgument, MAX_NAME_LEN, Name, Term, TermBounds},
};

/// The term bounds the targets validate against: the agent's defaults (1 s ..= 1 day).
pub fn bounds() -> TermBounds {
    TermBounds::default()
}

/// An accepted name is the text it was given, 1..=253 characters of `[A-Za-z0-9._:/@-]` (the
/// alphabet the OpenAPI document states).
pub fn assert_name(name: &Name, given: &str) {
    let text = name.as_str();
    assert_eq!(text, given, "a name is kept as given");
    assert!(
        (1..=MAX_NAME_LEN).contains(&text.len()),
        "accepted a name of {} characters",
        text.len()
    );
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b)),
        "accepted a name outside the alphabet: {text:?}"
    );
}

/// An accepted election is its kind (the default one when empty, never the controller's) and
/// its name.
pub fn assert_key(key: &ElectionKey, kind: &str, election: &str) {
    let kind = if kind.is_empty() { DEFAULT_KIND } else { kind };
    assert_name(&key.kind, kind);
    assert_ne!(
        key.kind.as_str(),
        CONTROLLER_KIND,
        "the controller's kind is reserved"
    );
    assert_name(&key.election, election);
}

/// An accepted term is the one given, within the bounds.
pub fn assert_term(term: Term, bounds: TermBounds, given_ms: i64) {
    assert!(
        bounds.min <= term && term <= bounds.max,
        "accepted a term of {} ms",
        term.as_millis()
    );
    assert_eq!(i128::from(term.as_millis()), i128::from(given_ms));
}

/// An accepted Kubernetes object name: 1..=253 lower-case letters, digits, `-` and `.`.
pub fn assert_object_name(given: &str) {
    assert!(
        (1..=253).contains(&given.len())
            && given
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)),
        "accepted {given:?} as a Kubernetes object name"
    );
}

/// A refusal names one of the request's fields.
pub fn assert_names_field(err: &InvalidArgument, fields: &[&str]) {
    assert!(
        fields.contains(&err.field),
        "refused naming {:?}, not one of {fields:?}: {err}",
        err.field
    );
}
