//! Static bearer tokens, in kube-apiserver's `--token-auth-file` format: one CSV record per
//! line, `token,user,uid[,"group1,group2"]` — a file that works there works here, and means the
//! same (fields are not trimmed; columns after the fourth are ignored). Stricter where
//! kube-apiserver only warns: an empty token or user, or a token given twice, is refused.
//!
//! Only SHA-256 digests of the tokens are kept, and a presented token is compared with every one
//! of them in constant time, so neither memory nor timing gives a token away.

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

use super::Identity;

/// The SHA-256 digest of a token: what is kept and compared instead of the token.
pub(super) type TokenDigest = [u8; 32];

/// The digest of `token`.
pub(super) fn token_digest(token: &str) -> TokenDigest {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

/// The tokens of `EA_AUTH_TOKENS_FILE`.
#[derive(Debug)]
pub struct StaticTokens {
    entries: Vec<(TokenDigest, Identity)>,
}

/// Why a tokens file was refused: the line (from 1) and what is wrong with it. Never shows a
/// token.
#[derive(Debug, PartialEq, Eq)]
pub struct TokensError {
    /// The line at fault.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl StaticTokens {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let mut entries: Vec<(TokenDigest, Identity)> = Vec::new();
        let mut first_line_of: Vec<usize> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let error = |reason: String| TokensError {
                line: line_number,
                reason,
            };
            if line.is_empty() {
                continue;
            }
            let fields = csv_fields(line).map_err(|reason| error(reason.into()))?;
            if fields.len() < 3 {
                return Err(error(format!(
                    "expected at least 3 columns (token, user name, user uid), found {}",
                    fields.len()
                )));
            }
            if fields[0].is_empty() {
                return Err(error("empty token".into()));
            }
            if fields[1].is_empty() {
                return Err(error("empty user name".into()));
            }
            let digest = token_digest(&fields[0]);
            if let Some(i) = entries.iter().position(|(d, _)| *d == digest) {
                return Err(error(format!(
                    "the token of line {} again: a token names one user",
                    first_line_of[i]
                )));
            }
            let groups = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            entries.push((
                digest,
                Identity {
                    user: fields[1].clone(),
                    uid: fields[2].clone(),
                    groups,
                },
            ));
            first_line_of.push(line_number);
        }
        Ok(Self { entries })
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The identity `token` stands for. Compares with every entry, in constant time each.
    pub fn authenticate(&self, token: &str) -> Option<&Identity> {
        let wanted = token_digest(token);
        let mut found = None;
        for (digest, identity) in &self.entries {
            if bool::from(digest.ct_eq(&wanted)) {
                found = Some(identity);
            }
        }
        found
    }
}

/// The fields of one CSV line as Go's `encoding/csv` reads them (kube-apiserver's reader): `,`
/// separates; a field that starts with `"` is quoted, `""` in it is one `"`, and it must end
/// with `"` before the next `,` or the end of the line. A quoted field spanning lines is refused.
fn csv_fields(line: &str) -> Result<Vec<String>, &'static str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field does not end on its line"),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return Err("unexpected character after a quoted field"),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("a \" in a field that is not quoted"),
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_as_kube_apiserver_reads_them() {
        for (line, fields) in [
            ("t,alice,1", vec!["t", "alice", "1"]),
            ("t,alice,1,\"ops,dev\"", vec!["t", "alice", "1", "ops,dev"]),
            ("t,alice,1,ops", vec!["t", "alice", "1", "ops"]),
            ("t,alice,,", vec!["t", "alice", "", ""]),
            ("\"t,x\",alice,1", vec!["t,x", "alice", "1"]),
            ("t,\"al\"\"ice\",1", vec!["t", "al\"ice", "1"]),
            ("t, alice ,1\r", vec!["t", " alice ", "1"]),
            (
                "t,alice,1,\"a\",extra",
                vec!["t", "alice", "1", "a", "extra"],
            ),
        ] {
            assert_eq!(csv_fields(line).unwrap(), fields, "{line:?}");
        }
        for line in ["t,\"alice,1", "t,\"alice\"x,1", "t,al\"ice,1"] {
            assert!(csv_fields(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn a_token_of_the_file_authenticates_its_user_with_uid_and_groups() {
        let tokens = StaticTokens::parse(
            "s3cret-a,alice,uid-1,\"ops,jobs-eu\"\n\ns3cret-b,bob,uid-2\ns3cret-c,carol,uid-3,\"\"\n",
        )
        .unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(
            tokens.authenticate("s3cret-a"),
            Some(&Identity {
                user: "alice".into(),
                uid: "uid-1".into(),
                groups: vec!["ops".into(), "jobs-eu".into()],
            })
        );
        assert_eq!(tokens.authenticate("s3cret-b").unwrap().user, "bob");
        assert!(tokens.authenticate("s3cret-b").unwrap().groups.is_empty());
        assert!(tokens.authenticate("s3cret-c").unwrap().groups.is_empty());
        for wrong in ["", "s3cret", "s3cret-a ", "S3CRET-A", "alice"] {
            assert_eq!(tokens.authenticate(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_line_and_never_the_token() {
        for (text, line, reason) in [
            ("a,alice,1\nb,bob\n", 2, "expected at least 3 columns"),
            (",alice,1\n", 1, "empty token"),
            ("s3cret,,1\n", 1, "empty user name"),
            (
                "s3cret,alice,1\n\ns3cret,bob,2\n",
                3,
                "the token of line 1 again",
            ),
            ("s3cret,\"alice,1\n", 1, "does not end on its line"),
        ] {
            let err = StaticTokens::parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err:?}");
            assert!(err.reason.contains(reason), "{text:?}: {err:?}");
            assert!(!err.reason.contains("s3cret"), "{err:?}");
        }
    }
}
