//! The authorization policy: which identities may do what to which elections. Pure: parsed from
//! YAML once at start-up, then asked one question per request, [`Policy::allows`].
//!
//! A request is allowed when at least one rule names the caller (its user name, or one of its
//! groups as `group:NAME`), the election's kind, the election and the verb. Names are matched
//! with `*` globs (any run of characters, `/` included; names can never contain `*` themselves).

use std::fmt;

use serde::Deserialize;

use super::{Identity, Target, Verb};

/// Authorization rules, parsed from `EA_AUTH_POLICY_FILE` (or the default one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    subjects: Vec<Subject>,
    kinds: Vec<Glob>,
    elections: Vec<Glob>,
    /// `None`: every verb (`*`).
    verbs: Option<Vec<Verb>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    User(Glob),
    Group(Glob),
}

/// A pattern where `*` stands for any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob(String);

impl Glob {
    fn matches(&self, text: &str) -> bool {
        glob_matches(self.0.as_bytes(), text.as_bytes())
    }

    fn is_everything(&self) -> bool {
        self.0 == "*"
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `text` matches `pattern`, `*` matching any run of bytes. Greedy with backtracking to
/// the last `*` only, so it takes at most `pattern.len() × text.len()` steps.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            last_star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star, matched)) = last_star {
            // Let the last `*` swallow one more byte and try again from there.
            p = star + 1;
            t = matched + 1;
            last_star = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The policy file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    subjects: Vec<String>,
    kinds: Vec<String>,
    elections: Vec<String>,
    verbs: Vec<String>,
}

impl Policy {
    /// The policy when authentication is on and no policy file is given: any authenticated
    /// identity may do everything but `handover`, which takes leadership from whoever holds it.
    pub fn default_for_authenticated() -> Self {
        let everything = || vec![Glob("*".into())];
        Self {
            rules: vec![Rule {
                subjects: vec![Subject::User(Glob("*".into()))],
                kinds: everything(),
                elections: everything(),
                verbs: Some(
                    Verb::ALL
                        .into_iter()
                        .filter(|v| *v != Verb::Handover)
                        .collect(),
                ),
            }],
        }
    }

    /// Parses a policy file's YAML. The error is one line, naming the rule at fault (counted
    /// from 1) where there is one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = serde_saphyr::from_str(text).map_err(|err| {
            err.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })?;
        let rules = file
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                Rule::parse(rule).map_err(|reason| format!("rule {}: {reason}", index + 1))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Whether `who` may `verb` on `target`.
    pub fn allows(&self, who: &Identity, verb: Verb, target: &Target<'_>) -> bool {
        self.rules.iter().any(|rule| rule.allows(who, verb, target))
    }
}

impl Rule {
    fn parse(rule: RuleFile) -> Result<Self, String> {
        let non_empty = |field: &str, values: &[String]| {
            if values.is_empty() {
                Err(format!("{field} must name at least one (\"*\" for all)"))
            } else if values.iter().any(String::is_empty) {
                Err(format!("{field} must not contain an empty name"))
            } else {
                Ok(())
            }
        };
        non_empty("subjects", &rule.subjects)?;
        non_empty("kinds", &rule.kinds)?;
        non_empty("elections", &rule.elections)?;
        non_empty("verbs", &rule.verbs)?;
        let subjects = rule
            .subjects
            .into_iter()
            .map(|s| match s.strip_prefix("group:") {
                Some("") => Err("subject \"group:\" names no group".to_owned()),
                Some(group) => Ok(Subject::Group(Glob(group.to_owned()))),
                None => Ok(Subject::User(Glob(s))),
            })
            .collect::<Result<_, _>>()?;
        let verbs = if rule.verbs.iter().any(|v| v == "*") {
            None
        } else {
            Some(
                rule.verbs
                    .iter()
                    .map(|v| {
                        Verb::parse(v).ok_or_else(|| {
                            format!(
                                "unknown verb {v:?}; allowed: {}, or *",
                                Verb::ALL.map(Verb::as_str).join(", ")
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            )
        };
        let globs = |values: Vec<String>| values.into_iter().map(Glob).collect();
        Ok(Self {
            subjects,
            kinds: globs(rule.kinds),
            elections: globs(rule.elections),
            verbs,
        })
    }

    fn allows(&self, who: &Identity, verb: Verb, target: &Target<'_>) -> bool {
        let names_subject = self.subjects.iter().any(|subject| match subject {
            Subject::User(glob) => glob.matches(&who.user),
            Subject::Group(glob) => who.groups.iter().any(|g| glob.matches(g)),
        });
        let names_verb = self
            .verbs
            .as_ref()
            .is_none_or(|verbs| verbs.contains(&verb));
        let (kind, election) = target.policy_names();
        let names_target = self.kinds.iter().any(|k| k.matches(kind))
            && match election {
                Some(election) => self.elections.iter().any(|e| e.matches(election)),
                // A listing shows every election of the kind: only a rule for all of them grants it.
                None => self.elections.iter().any(Glob::is_everything),
            };
        names_subject && names_verb && names_target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            uid: String::new(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn globs_match_any_run_of_characters_including_slashes() {
        for (pattern, text, matches) in [
            ("*", "", true),
            ("*", "anything/at:all", true),
            ("jobs", "jobs", true),
            ("jobs", "jobs2", false),
            ("jobs", "job", false),
            ("jobs-*", "jobs-", true),
            ("jobs-*", "jobs-eu/1", true),
            ("jobs-*", "job-eu", false),
            ("*-eu", "jobs-eu", true),
            ("*-eu", "jobs-eu-2", false),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-c-b", false),
            ("a**", "a", true),
            (
                "system:serviceaccount:shop:*",
                "system:serviceaccount:shop:web",
                true,
            ),
            (
                "system:serviceaccount:shop:*",
                "system:serviceaccount:stock:web",
                false,
            ),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(
                glob_matches(pattern.as_bytes(), text.as_bytes()),
                matches,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn a_long_glob_against_a_long_name_stays_cheap() {
        let pattern = "*a".repeat(100);
        let text = "a".repeat(253) + "b";
        let started = std::time::Instant::now();
        assert!(!glob_matches(pattern.as_bytes(), text.as_bytes()));
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
    }

    const POLICY: &str = r#"
rules:
  - subjects: [alice, "group:jobs-*"]
    kinds: [default]
    elections: ["jobs-*"]
    verbs: [get, watch, campaign, extend, resign]
  - subjects: ["system:serviceaccount:ops:*"]
    kinds: ["*"]
    elections: ["*"]
    verbs: ["*"]
  - subjects: [auditor]
    kinds: [default]
    elections: ["*"]
    verbs: [get, list]
  - subjects: [viewer]
    kinds: [kube]
    elections: [shop]
    verbs: [get]
"#;

    #[test]
    fn each_request_is_allowed_exactly_when_a_rule_names_subject_kind_election_and_verb() {
        use Verb::*;
        let policy = Policy::parse(POLICY).unwrap();
        let alice = identity("alice", &[]);
        let bob_in_jobs = identity("bob", &["jobs-eu", "system:authenticated"]);
        let carol = identity("carol", &["system:authenticated"]);
        let ops = identity("system:serviceaccount:ops:deployer", &[]);
        let auditor = identity("auditor", &[]);
        let viewer = identity("viewer", &[]);
        let jobs = Target::election("default", "jobs-1");
        let jobs_by_empty_kind = Target::election("", "jobs-1");
        let other_election = Target::election("default", "web");
        let other_kind = Target::election("batch", "jobs-1");
        let cases: &[(&Identity, Verb, &Target, bool)] = &[
            (&alice, Campaign, &jobs, true),
            (&alice, Campaign, &jobs_by_empty_kind, true),
            (&alice, Extend, &jobs, true),
            (&alice, Resign, &jobs, true),
            (&alice, Get, &jobs, true),
            (&alice, Watch, &jobs, true),
            (&alice, Handover, &jobs, false),
            (&alice, List, &Target::kind("default"), false),
            (&alice, Campaign, &other_election, false),
            (&alice, Campaign, &other_kind, false),
            (&bob_in_jobs, Campaign, &jobs, true),
            (&bob_in_jobs, Handover, &jobs, false),
            (&carol, Get, &jobs, false),
            (&ops, Handover, &jobs, true),
            (&ops, Handover, &other_kind, true),
            (&ops, List, &Target::kind("batch"), true),
            (&ops, Get, &Target::pods("shop"), true),
            (&auditor, List, &Target::kind("default"), true),
            (&auditor, List, &Target::kind(""), true),
            (&auditor, List, &Target::kind("batch"), false),
            (&auditor, Get, &other_election, true),
            (&auditor, Watch, &other_election, false),
            (&viewer, Get, &Target::pods("shop"), true),
            (&viewer, Get, &Target::pods("stock"), false),
            // Pods are read as kind `kube`: a rule for that kind covers both.
            (&viewer, Get, &Target::election("kube", "shop"), true),
        ];
        for (who, verb, target, allowed) in cases {
            assert_eq!(
                policy.allows(who, *verb, target),
                *allowed,
                "{} {} {target}",
                who.user,
                verb.as_str()
            );
        }
    }

    #[test]
    fn a_listing_needs_a_rule_for_every_election_of_the_kind() {
        let policy = Policy::parse(
            "rules:\n  - {subjects: [a], kinds: [default], elections: [\"jobs-*\", \"*x\"], verbs: [list]}\n",
        )
        .unwrap();
        assert!(!policy.allows(&identity("a", &[]), Verb::List, &Target::kind("default")));
    }

    #[test]
    fn the_default_policy_allows_everything_but_handover() {
        let policy = Policy::default_for_authenticated();
        let anyone = identity("anyone", &[]);
        for verb in Verb::ALL {
            for target in [
                Target::election("default", "jobs"),
                Target::kind("team/a"),
                Target::pods("shop"),
            ] {
                assert_eq!(
                    policy.allows(&anyone, verb, &target),
                    verb != Verb::Handover,
                    "{} {target}",
                    verb.as_str()
                );
            }
        }
    }

    /// `config/policy.yaml` is valid, means what its comments say, and is the README's example.
    #[test]
    fn the_example_policy_is_valid_and_shown_in_the_readme() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("config/policy.yaml")).unwrap();
        let policy = Policy::parse(&text).unwrap();
        let runner = identity("jobs-runner", &[]);
        let shop = identity("system:serviceaccount:shop:web", &[]);
        let ops = identity("alice", &["ops"]);
        let nightly = Target::election("", "jobs-nightly");
        assert!(policy.allows(&runner, Verb::Campaign, &nightly));
        assert!(!policy.allows(&runner, Verb::Handover, &nightly));
        assert!(policy.allows(&shop, Verb::Handover, &Target::election("shop", "db")));
        assert!(!policy.allows(&shop, Verb::Get, &nightly));
        assert!(policy.allows(&ops, Verb::Handover, &nightly));
        assert!(policy.allows(&ops, Verb::Get, &Target::pods("anywhere")));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(
            readme.contains(&format!("```yaml\n{text}```")),
            "README.md's policy example differs from config/policy.yaml"
        );
    }

    #[test]
    fn an_empty_rule_list_denies_everything() {
        let policy = Policy::parse("rules: []\n").unwrap();
        assert!(!policy.allows(
            &identity("alice", &[]),
            Verb::Get,
            &Target::election("default", "jobs")
        ));
    }

    #[test]
    fn bad_policies_are_refused_in_one_line_naming_the_rule_and_field() {
        for (text, expected) in [
            (
                "rules:\n  - {subjects: [a], kinds: [x], elections: [y], verbs: [rule]}\n",
                "rule 1: unknown verb \"rule\"; allowed: get, list, watch, campaign, extend, resign, handover, or *",
            ),
            (
                "rules:\n  - {subjects: [a], kinds: [x], elections: [y], verbs: [get]}\n  - {subjects: [], kinds: [x], elections: [y], verbs: [get]}\n",
                "rule 2: subjects must name at least one",
            ),
            (
                "rules:\n  - {subjects: [\"group:\"], kinds: [x], elections: [y], verbs: [get]}\n",
                "rule 1: subject \"group:\" names no group",
            ),
            (
                "rules:\n  - {subjects: [a], kinds: [x], elections: [\"\"], verbs: [get]}\n",
                "rule 1: elections must not contain an empty name",
            ),
            (
                "rules:\n  - {subjects: [a], kinds: [x], elections: [y], verbs: [get], namespaces: [z]}\n",
                "namespaces",
            ),
            (
                "rules:\n  - {subjects: [a], kinds: [x], verbs: [get]}\n",
                "elections",
            ),
            ("rule: []\n", "rule"),
            ("rules: [\n", ""),
        ] {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
